"""The database adapter: engine setup for SQLite and PostgreSQL, and the queries the service needs.

The service talks to `Store` only; SQLAlchemy exceptions are translated here (`StoreUnavailable`,
`Conflict`) so nothing above this module knows the driver. Methods are synchronous and short;
async front ends call the service through a worker thread so the event loop never waits on IO.
"""

from __future__ import annotations

import contextvars
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlmodel import Session, col, select

from justscan_mcp.errors import Conflict, InvalidInput, StoreUnavailable
from justscan_mcp.migrations import HEAD
from justscan_mcp.models import (
    OPEN_STATES,
    OPEN_STATES_SQL,
    ApiKey,
    DashboardSession,
    Delivery,
    DeliveryAttempt,
    Event,
    FirstScan,
    InstanceSecret,
    Team,
    UTCDateTime,
    Webhook,
    storable_text,
)
from justscan_mcp.security import generate_instance_key

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6A757374  # "just": one advisory-lock key for schema changes
NOTIFY_CHANNEL = "justscan_deliveries"
T = TypeVar("T")

# last_used_at is informative; writing it on every call would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def normalise_url(url: str) -> str:
    """Accept the plain ``postgresql://`` form and pick the psycopg 3 driver for it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


# Set by `Store.session(write=True)`: on SQLite such a transaction starts with BEGIN IMMEDIATE.
# A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY_SNAPSHOT
# (WAL) when another writer committed in between; IMMEDIATE takes the write lock up front and
# waits for it (busy_timeout) instead.
_sqlite_begin: contextvars.ContextVar[str] = contextvars.ContextVar("sqlite_begin", default="BEGIN")


def _sqlite_begin_listener(conn: Any) -> None:
    conn.exec_driver_sql(_sqlite_begin.get())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's own would always be DEFERRED).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # busy_timeout makes writers queue instead of failing; WAL lets readers run beside the one
    # writer. Switching a new file to WAL needs a moment alone with it, and SQLite answers "locked"
    # at once (no busy handler) when another connection is opening the same new file: try again.
    cur.execute("PRAGMA busy_timeout=30000")
    for attempt in range(50):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.02 * (attempt + 1))
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# SQLite's primary result code SQLITE_ERROR: a statement that is wrong (no such table or column,
# a syntax error). pysqlite raises it as OperationalError like a locked or unreadable file, but it
# is a bug, not an outage: retrying it would fail the same way forever.
_SQLITE_ERROR = 1


def _is_programming_error(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == _SQLITE_ERROR


def _conflict(exc: BaseException | None) -> Conflict:
    log.info("integrity error translated into a conflict: %s", str(exc).splitlines()[0] if exc else "")
    return Conflict("request", "a concurrent change conflicted with this request; look again and retry")


def _refused_value(exc: BaseException | None) -> InvalidInput:
    first = str(exc).splitlines()[0] if exc else "unknown reason"
    return InvalidInput("data", f"the database refused a value ({first})")


def create_db_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file's directory when needed."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_listener)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class Store:
    """Queries over one database. Every method opens and closes its own short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The column type's own conversions, for the statements that bypass SQLAlchemy's binding.
        # The dialect's own implementation: the decorator's bind_processor alone would hand
        # SQLite's driver an aware datetime, stored in another text format than every other row.
        utc = UTCDateTime().dialect_impl(engine.dialect)
        bind = utc.bind_processor(engine.dialect)
        result = utc.result_processor(engine.dialect, None)
        self._dt_bind: Callable[[datetime | None], Any] = bind or (lambda v: v)
        self._dt_result: Callable[[Any], datetime | None] = result or (lambda v: v)
        self._mark = "?" if engine.dialect.name == "sqlite" else "%s"  # the driver's placeholder
        dbapi = engine.dialect.dbapi
        # The driver's own classes, for driver SQL that SQLAlchemy does not wrap.
        self._driver_errors: tuple[type[BaseException], ...] = (
            (dbapi.OperationalError, dbapi.InterfaceError) if dbapi is not None else ()
        )
        self._driver_integrity: tuple[type[BaseException], ...] = (
            (dbapi.IntegrityError,) if dbapi is not None else ()
        )
        self._driver_data: tuple[type[BaseException], ...] = (dbapi.DataError,) if dbapi is not None else ()

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(create_db_engine(url))

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session whose commit happens on clean exit. `write=True` for a transaction that
        reads and then writes (SQLite takes the write lock at BEGIN).

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        with self._transaction(write=write), Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[None]:
        """What every transaction shares, ORM or driver SQL: the SQLite BEGIN mode, and the
        translation of driver errors into the error tree. Database outages (wrapped by SQLAlchemy
        or raised by the driver itself) become StoreUnavailable; a constraint that a concurrent
        change broke becomes Conflict and a value the database refuses InvalidInput, so no race
        or odd value reaches a caller as a bare 500. A wrong statement stays what it is: a bug.

        Raises:
            StoreUnavailable, Conflict, InvalidInput.
        """
        mode = _sqlite_begin.set("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except (OperationalError, SAInterfaceError) as exc:
            if _is_programming_error(exc.orig):
                raise
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        except IntegrityError as exc:
            raise _conflict(exc.orig) from exc
        except DataError as exc:
            raise _refused_value(exc.orig) from exc
        except self._driver_integrity as exc:
            raise _conflict(exc) from exc
        except self._driver_data as exc:
            raise _refused_value(exc) from exc
        except self._driver_errors as exc:
            if _is_programming_error(exc):
                raise
            raise StoreUnavailable(f"database unavailable: {exc}") from exc
        finally:
            _sqlite_begin.reset(mode)

    # --- schema -----------------------------------------------------------------------------

    def _alembic(self, connection: Any) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent). Concurrent callers take turns:
        PostgreSQL holds an advisory lock for the transaction, SQLite its write lock.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        from alembic import command

        token = _sqlite_begin.set("BEGIN IMMEDIATE")
        try:
            with self.engine.begin() as connection:
                if self.backend == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
                command.upgrade(self._alembic(connection), "head")
        except (OperationalError, SAInterfaceError) as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        finally:
            _sqlite_begin.reset(token)

    def _stored_revision(self) -> str | None:
        """The revision recorded in alembic_version, or None when there is none yet.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        try:
            with self.engine.connect() as connection:
                return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, SAInterfaceError) as exc:
            if isinstance(exc, OperationalError) and "alembic_version" in str(exc.orig):
                return None  # SQLite: no such table yet
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        except ProgrammingError:
            return None  # PostgreSQL: relation does not exist yet

    def schema_revision(self) -> tuple[str | None, str]:
        """(the database's revision, the newest this code knows).

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic(None)).get_current_head()
        assert head is not None
        try:
            with self.engine.connect() as connection:
                current = MigrationContext.configure(connection).get_current_revision()
        except (OperationalError, SAInterfaceError) as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        return current, head

    def create_schema(self) -> None:
        """Make the schema current: migrate SQLite (the embedded default), and on PostgreSQL
        check that `justscan-mcp db upgrade` has been run.

        Raises:
            StoreUnavailable: unreachable, or (PostgreSQL) a schema that is not current.
        """
        if self._stored_revision() == HEAD:
            return  # current: no need to load Alembic (it costs a fifth of a cold start)
        if self.backend == "sqlite":
            self.migrate()
            return
        current, head = self.schema_revision()
        if current != head:
            raise StoreUnavailable(
                f"database schema is at revision {current or 'none'}, this version needs {head}: "
                "run `justscan-mcp db upgrade`"
            )

    def ping(self) -> None:
        """Raises: StoreUnavailable when the database does not answer."""
        with self.session() as s:
            s.exec(select(1)).one()

    def instance_secret(self, name: str) -> str:
        """A random value shared by every process on this database, created on first use."""
        with self.session() as s:
            row = s.get(InstanceSecret, name)
            if row is not None:
                return row.value
        try:
            with self.session() as s:
                s.add(InstanceSecret(name=name, value=generate_instance_key()))
        except Conflict:
            pass  # another process won the race; read its value below
        with self.session() as s:
            row = s.get(InstanceSecret, name)
            assert row is not None
            return row.value

    # --- teams ------------------------------------------------------------------------------

    def create_team(self, *, name: str, now: datetime) -> Team:
        """Raises: Conflict when the name is taken."""
        team = Team(name=name, created_at=now)
        try:
            with self.session() as s:
                s.add(team)
                s.flush()
        except Conflict:
            raise Conflict("name", f"a team named {name!r} already exists") from None
        return team

    def get_team(self, team_id: int) -> Team | None:
        with self.session() as s:
            return s.get(Team, team_id)

    def list_teams(self) -> Sequence[Team]:
        with self.session() as s:
            return s.exec(select(Team).order_by(col(Team.id))).all()

    def count_teams(self) -> int:
        with self.session() as s:
            return s.exec(select(func.count()).select_from(Team)).one()

    # --- API keys ---------------------------------------------------------------------------

    def add_api_key(self, key: ApiKey) -> ApiKey:
        with self.session() as s:
            s.add(key)
            s.flush()
        return key

    def get_api_key(self, key_id: int) -> ApiKey | None:
        with self.session() as s:
            return s.get(ApiKey, key_id)

    def get_api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        with self.session() as s:
            return s.exec(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()

    def list_api_keys(self, team_id: int) -> Sequence[ApiKey]:
        with self.session() as s:
            return s.exec(select(ApiKey).where(ApiKey.team_id == team_id).order_by(col(ApiKey.id))).all()

    def update_api_key(self, key_id: int, **values: Any) -> ApiKey | None:
        with self.session(write=True) as s:
            key = s.get(ApiKey, key_id)
            if key is None:
                return None
            for name, value in values.items():
                setattr(key, name, value)
            s.add(key)
            return key

    def touch_api_key(self, key_id: int, *, now: datetime) -> None:
        """Record use, at most once per `LAST_USED_RESOLUTION`, in one conditional UPDATE."""
        with self.session() as s:
            s.execute(
                update(ApiKey)
                .where(col(ApiKey.id) == key_id)
                .where(
                    (col(ApiKey.last_used_at).is_(None))
                    | (col(ApiKey.last_used_at) < now - LAST_USED_RESOLUTION)
                )
                .values(last_used_at=now)
            )

    # --- webhooks ---------------------------------------------------------------------------

    def add_webhook(self, webhook: Webhook) -> Webhook:
        with self.session() as s:
            s.add(webhook)
            s.flush()
        return webhook

    def get_webhook(self, *, team_id: int, webhook_id: int) -> Webhook | None:
        with self.session() as s:
            return s.exec(
                select(Webhook).where(Webhook.id == webhook_id).where(Webhook.team_id == team_id)
            ).first()

    def list_webhooks(self, *, team_id: int, after_id: int, limit: int) -> Sequence[Webhook]:
        """Up to `limit` webhooks of the team with id > `after_id`, in id order (keyset pagination)."""
        with self.session() as s:
            return s.exec(
                select(Webhook)
                # A range, not `=`, for the same planner reason as in list_deliveries.
                .where(col(Webhook.team_id) >= team_id)
                .where(col(Webhook.team_id) <= team_id)
                .where(col(Webhook.id) > after_id)
                .order_by(col(Webhook.team_id), col(Webhook.id))
                .limit(limit)
            ).all()

    def update_webhook(
        self, *, team_id: int, webhook_id: int, now: datetime, **values: Any
    ) -> Webhook | None:
        """Change fields of a team's webhook. Setting `active=False` also ends every open
        delivery of it, leased or not (state failed, with a note), in the same transaction, so an
        inactive webhook receives nothing new. A send already in flight keeps its lease: its
        attempt is logged when it finishes, and the delivery stays `failed`.

        Raises:
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            webhook = s.exec(
                select(Webhook).where(Webhook.id == webhook_id).where(Webhook.team_id == team_id)
            ).first()
            if webhook is None:
                return None
            for name, value in values.items():
                setattr(webhook, name, value)
            webhook.updated_at = now
            s.add(webhook)
            if values.get("active") is False:
                s.execute(
                    update(Delivery)
                    .where(col(Delivery.webhook_id) == webhook_id)
                    .where(col(Delivery.state).in_(OPEN_STATES))
                    # A test delivery goes out whatever `active` says: it is not cancelled.
                    .where(col(Delivery.is_test).is_(False))
                    .values(
                        state="failed",
                        next_attempt_at=None,
                        note="cancelled: webhook deactivated",
                        updated_at=now,
                    )
                )
            return webhook

    def rotate_secret(
        self, *, team_id: int, webhook_id: int, secret: str, grace_until: datetime | None, now: datetime
    ) -> bool:
        """Make `secret` the signing secret, keeping the current one as the previous secret until
        `grace_until` (none: dropped at once). One UPDATE whose SET reads the row as it is when
        the update runs, so concurrent rotations each keep the secret the other just made.
        Returns False when the webhook does not exist in the team.

        Raises:
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            result = s.execute(
                update(Webhook)
                .where(col(Webhook.id) == webhook_id)
                .where(col(Webhook.team_id) == team_id)
                .values(
                    secret=secret,
                    previous_secret=col(Webhook.secret) if grace_until is not None else None,
                    previous_secret_expires_at=grace_until,
                    updated_at=now,
                )
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def redeliver(self, *, team_id: int, delivery_id: int, now: datetime) -> Delivery | None:
        """A new pending delivery of the same event to the same webhook, linked to the original.
        The webhook is read (and on PostgreSQL locked against a concurrent deactivation) in the
        same transaction as the insert.

        Raises:
            Conflict: (webhook_id) the webhook is inactive. StoreUnavailable.
        """
        with self.session(write=True) as s:
            original = s.exec(
                select(Delivery).where(Delivery.id == delivery_id).where(Delivery.team_id == team_id)
            ).first()
            if original is None:
                return None
            webhook = s.exec(
                select(Webhook).where(Webhook.id == original.webhook_id).with_for_update(read=True)
            ).first()
            if webhook is None:
                return None
            if not webhook.active:
                raise Conflict(
                    "webhook_id", f"webhook {webhook.id} is inactive; set it active before redelivering"
                )
            copy = Delivery(
                team_id=team_id,
                webhook_id=original.webhook_id,
                event_id=original.event_id,
                event=original.event,
                state="pending",
                is_test=original.is_test,
                redelivery_of=original.id,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            s.add(copy)
            s.flush()
            self._notify(s)
            return copy

    def delete_webhook(self, *, team_id: int, webhook_id: int) -> bool:
        with self.session() as s:
            result = s.execute(
                delete(Webhook).where(col(Webhook.id) == webhook_id).where(col(Webhook.team_id) == team_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # --- events and deliveries ----------------------------------------------------------------

    def record_event(
        self,
        *,
        team_id: int,
        event: str,
        payload: bytes,
        now: datetime,
        first_scan: tuple[int, bytes] | None = None,
    ) -> tuple[int, list[int]]:
        """Record an event and fan it out, in one transaction (the outbox): one pending delivery
        per active webhook of the team subscribed to it. With `first_scan=(qr_code_id, payload)`
        the first scan of that QR code also records a first_scan event; the primary key of
        `first_scans` decides which scan is first, also under concurrent scans.

        Returns the event id and the ids of every delivery created (first_scan ones included).
        """
        with self.session(write=True) as s:
            # FOR SHARE (PostgreSQL): a concurrent delete or deactivation of one of these webhooks
            # waits for this transaction, or this one sees its result; without the lock an event
            # racing a delete failed on the foreign key and one racing a deactivation left an
            # open delivery to an inactive webhook. SQLite's write lock already serialises them.
            hooks = s.exec(
                select(Webhook)
                .where(Webhook.team_id == team_id)
                .where(col(Webhook.active))
                .with_for_update(read=True)
            ).all()
            scan = self._add_event(s, team_id, event, payload, now)
            deliveries = self._fan_out(s, hooks, scan, now)
            if first_scan is not None:
                qr_code_id, first_payload = first_scan
                if self._claim_first_scan(s, team_id=team_id, qr_code_id=qr_code_id, event_id=scan.id):
                    first = self._add_event(s, team_id, "first_scan", first_payload, now)
                    deliveries += self._fan_out(s, hooks, first, now)
            s.flush()
            if deliveries:
                self._notify(s)
            assert scan.id is not None
            return scan.id, [d.id for d in deliveries if d.id is not None]

    def _notify(self, s: Session) -> None:
        """Tell dispatchers in other processes that work is due. NOTIFY is transactional: it is
        delivered when this transaction commits, never for work that was rolled back."""
        if self.backend == "postgresql":
            s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def sqlite_path(self) -> str | None:
        """The SQLite database file (for the dispatcher's cross-process wake-up), else None."""
        if self.backend != "sqlite":
            return None
        name = self.engine.url.database
        return None if not name or name == ":memory:" else str(Path(name).expanduser())

    def newest_delivery_probe(self) -> NewestDeliveryProbe | None:
        """SQLite only: a reader of the newest delivery id on a connection of its own, for the
        dispatcher's cross-process wake-up. None on other backends (they have LISTEN/NOTIFY)."""
        path = self.sqlite_path()
        return None if path is None else NewestDeliveryProbe(path)

    def listen_dsn(self) -> str | None:
        """A libpq URL for a LISTEN connection (PostgreSQL only)."""
        if self.backend != "postgresql":
            return None
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    @staticmethod
    def _add_event(s: Session, team_id: int, name: str, payload: bytes, now: datetime) -> Event:
        row = Event(team_id=team_id, name=name, payload=payload.decode("utf-8"), created_at=now)
        s.add(row)
        s.flush()
        return row

    @staticmethod
    def _fan_out(
        s: Session, hooks: Sequence[Webhook], ev: Event, now: datetime, *, is_test: bool = False
    ) -> list[Delivery]:
        assert ev.id is not None
        rows = [
            Delivery(
                team_id=ev.team_id,
                webhook_id=h.id,
                event_id=ev.id,
                event=ev.name,
                state="pending",
                is_test=is_test,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            for h in hooks
            if h.id is not None and (is_test or ev.name in h.events)
        ]
        s.add_all(rows)
        s.flush()
        return rows

    def _claim_first_scan(self, s: Session, *, team_id: int, qr_code_id: int, event_id: int | None) -> bool:
        values = {"team_id": team_id, "qr_code_id": qr_code_id, "event_id": event_id}
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(FirstScan).values(**values).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(FirstScan).values(**values).on_conflict_do_nothing()
        result = s.execute(stmt.returning(col(FirstScan.qr_code_id)))
        return result.first() is not None

    def record_test_delivery(self, *, webhook: Webhook, payload: bytes, now: datetime) -> int:
        """A `test` event for one webhook and its single-attempt delivery, in one transaction."""
        with self.session(write=True) as s:
            ev = self._add_event(s, webhook.team_id, "test", payload, now)
            (delivery,) = self._fan_out(s, [webhook], ev, now, is_test=True)
            self._notify(s)
            assert delivery.id is not None
            return delivery.id

    # The dispatcher's two hot statements run as driver SQL: SQLAlchemy's per-row compile, bind
    # and coercion work was most of a worker's database time (claim plus save, thread CPU on
    # SQLite at 32 per batch: ~80 µs per delivery, ~32 µs here), and it held the GIL the send
    # loop needs.

    @contextmanager
    def _driver(self, *, write: bool) -> Iterator[Any]:
        """A DBAPI cursor in one transaction, committed on clean exit.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        with self._transaction(write=write), self.engine.begin() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                yield cur
            finally:
                cur.close()

    # The f-strings in these statements only ever insert placeholders and constants (S608 below).

    def _marks(self, n: int) -> str:
        return ", ".join([self._mark] * n)

    def _db_now(self, offset: str | None = None) -> str:
        """SQL for the database's clock (plus `offset`, a placeholder for seconds), in the stored
        format. Leases are judged by this one clock, so hosts whose clocks disagree cannot take
        each other's work early; evaluated when the statement runs, after any lock wait."""
        if self.backend == "postgresql":
            return "clock_timestamp()" + (f" + make_interval(secs => {offset})" if offset else "")
        # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff'; %f gives
        # milliseconds, so pad to the same width for text comparison and read-back.
        shift = f", '+' || {offset} || ' seconds'" if offset else ""
        return f"(strftime('%Y-%m-%d %H:%M:%f', 'now'{shift}) || '000')"

    def claim_due(
        self,
        *,
        claim: str,
        now: datetime,
        lease_seconds: float,
        limit: int,
        exclude: Sequence[int] = (),
        only: Sequence[int] | None = None,
    ) -> list[Claimed]:
        """Lease up to `limit` due deliveries to the claim token `claim`, atomically.

        Due: pending or retrying, next attempt time reached, and no live lease (an expired lease
        is how a crashed or stalled process's work comes back). The webhook must be active, except
        for a test delivery, which checks a receiver whatever the switch says. Each claim has its
        own token: a process that stalled past its lease and claimed the same rows again cannot
        save the first claim's results over the second's. The lease runs `lease_seconds` from
        the database's clock when the statement runs.

        PostgreSQL locks the rows it picks with FOR UPDATE SKIP LOCKED so concurrent claimers take
        disjoint sets without waiting; SQLite runs the whole UPDATE under its single write lock.
        The walk follows the partial index `ix_deliveries_open` in (next_attempt_at, id) order and
        stops after `limit` rows. `exclude` skips webhooks (the dispatcher's saturated and slow
        ones); `only` keeps just the listed webhooks (its slow lane).

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        m = self._mark
        dt = self._dt_bind
        lock = " FOR UPDATE OF d SKIP LOCKED" if self.backend == "postgresql" else ""
        which = ""
        if exclude:
            which += f" AND d.webhook_id NOT IN ({self._marks(len(exclude))})"
        if only is not None:
            which += f" AND d.webhook_id IN ({self._marks(len(only))})"
        claim_sql = (
            f"UPDATE deliveries SET lease_owner = {m}, lease_expires_at = {self._db_now(m)}"  # noqa: S608
            " WHERE id IN ("
            " SELECT d.id FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"
            f" WHERE (w.active OR d.is_test) AND d.{OPEN_STATES_SQL} AND d.next_attempt_at <= {m}"
            f" AND (d.lease_expires_at IS NULL OR d.lease_expires_at < {self._db_now()}){which}"
            f" ORDER BY d.next_attempt_at, d.id LIMIT {m}{lock}"
            ") RETURNING id"
        )
        with self._driver(write=True) as cur:
            cur.execute(claim_sql, (claim, float(lease_seconds), dt(now), *exclude, *(only or ()), limit))
            ids = [row[0] for row in cur.fetchall()]
            if not ids:
                return []
            cur.execute(
                "SELECT d.id, d.webhook_id, d.event, d.is_test, d.attempt_count, w.url, w.secret,"  # noqa: S608
                " w.previous_secret, w.previous_secret_expires_at, e.payload"
                " FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                f" JOIN events e ON e.id = d.event_id WHERE d.id IN ({self._marks(len(ids))})"
                " ORDER BY d.id",
                ids,
            )
            rows = cur.fetchall()
        read_dt = self._dt_result
        claimed = []
        for did, hook_id, ev, is_test, count, url, secret, prev, prev_until, payload in rows:
            prev_until = read_dt(prev_until)
            live_prev = bool(prev) and prev_until is not None and prev_until > now
            claimed.append(
                Claimed(
                    delivery_id=did,
                    webhook_id=hook_id,
                    event=ev,
                    is_test=bool(is_test),
                    attempt_number=count + 1,
                    url=url,
                    secrets=(secret, prev) if live_prev else (secret,),
                    payload=payload.encode("utf-8"),
                    claim=claim,
                )
            )
        return claimed

    def release(self, *, claim: str, delivery_ids: Sequence[int]) -> None:
        """Give back claimed deliveries that were not sent (over a webhook's in-flight cap): they
        are due again at once for any process.

        Raises:
            StoreUnavailable.
        """
        if not delivery_ids:
            return
        m = self._mark
        with self._driver(write=True) as cur:
            cur.execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_expires_at = NULL"  # noqa: S608
                f" WHERE id IN ({self._marks(len(delivery_ids))}) AND lease_owner = {m}",
                [*delivery_ids, claim],
            )

    def next_due_after(self, when: datetime) -> datetime | None:
        """The earliest retry time after `when` among open deliveries (the dispatcher's one
        timer), from the partial index in (next_attempt_at, id) order.

        Raises:
            StoreUnavailable.
        """
        with self.session() as s:
            return s.exec(
                select(Delivery.next_attempt_at)
                .where(text(OPEN_STATES_SQL))
                .where(col(Delivery.next_attempt_at) > when)
                .order_by(col(Delivery.next_attempt_at), col(Delivery.id))
                .limit(1)
            ).first()

    def complete(self, *, worker: str, results: Sequence[AttemptResult], now: datetime) -> list[int]:
        """Log attempts and move their deliveries on, in one transaction.

        A result is applied only while its claim still holds the delivery's lease: a claim whose
        lease was taken over (by another process, or by this one after a stall) never overwrites
        the new owner. A delivery cancelled while its send was in flight (its webhook was
        deactivated) keeps its lease until then: the attempt is logged and the delivery stays
        where the cancellation put it. Response bodies and errors are stored as `storable_text`.
        Returns the ids whose results were applied.

        Raises:
            StoreUnavailable: when the database cannot be reached. Conflict, InvalidInput: a row
                the database refuses (the caller saves row by row to find it).
        """
        if not results:
            return []
        m = self._mark
        dt = self._dt_bind
        ids = [r.delivery_id for r in results]
        lock = " FOR UPDATE" if self.backend == "postgresql" else ""
        with self._driver(write=True) as cur:
            cur.execute(
                f"SELECT id, lease_owner, state FROM deliveries WHERE id IN ({self._marks(len(ids))}){lock}",  # noqa: S608
                ids,
            )
            rows = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
            mine: list[AttemptResult] = []
            for r in results:
                owner, state = rows.get(r.delivery_id, (None, None))
                if owner is not None and owner == r.claim:
                    if state not in OPEN_STATES:
                        # Cancelled under the send: log what happened, keep the final state.
                        r = replace(r, state=state, next_attempt_at=None)
                    mine.append(r)
                elif state is None:
                    log.info("delivery %s was deleted with its webhook while it was sent", r.delivery_id)
                else:
                    log.warning("delivery %s: lease lost before its result was saved", r.delivery_id)
            if not mine:
                return []
            stamp = dt(now)
            cur.executemany(
                f"UPDATE deliveries SET state = {m}, attempt_count = {m}, next_attempt_at = {m},"  # noqa: S608
                f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {m} WHERE id = {m}",
                [(r.state, r.number, dt(r.next_attempt_at), stamp, r.delivery_id) for r in mine],
            )
            cur.executemany(
                "INSERT INTO delivery_attempts (delivery_id, number, worker, started_at, duration_ms,"  # noqa: S608
                f" status_code, response_body, error, next_retry_at) VALUES ({self._marks(9)})",
                [
                    (
                        r.delivery_id,
                        r.number,
                        worker,
                        dt(r.started_at),
                        r.duration_ms,
                        r.status_code,
                        storable_text(r.response_body),
                        storable_text(r.error),
                        dt(r.next_attempt_at),
                    )
                    for r in mine
                ],
            )
            return [r.delivery_id for r in mine]

    def get_delivery(
        self, *, team_id: int, delivery_id: int
    ) -> tuple[Delivery, list[DeliveryAttempt]] | None:
        with self.session() as s:
            d = s.exec(
                select(Delivery).where(Delivery.id == delivery_id).where(Delivery.team_id == team_id)
            ).first()
            if d is None:
                return None
            attempts = s.exec(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(col(DeliveryAttempt.number))
            ).all()
            return d, list(attempts)

    def list_deliveries(
        self,
        *,
        webhook_id: int,
        before_id: int | None,
        limit: int,
        state: str | None = None,
        event: str | None = None,
    ) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        """A webhook's deliveries, newest first (keyset on id), each with its attempts."""
        with self.session() as s:
            # The webhook filter is written as a range on purpose. With `webhook_id = X`, PostgreSQL
            # treats webhook_id as a constant, and ORDER BY id may then walk the primary key
            # backwards and filter, scanning every newer row of other webhooks first (~50 ms at 1M
            # rows, also the max() form). A range keeps (webhook_id, id) a real ordering that only
            # the composite index provides: 0.04 ms.
            q = (
                select(Delivery)
                .where(col(Delivery.webhook_id) >= webhook_id)
                .where(col(Delivery.webhook_id) <= webhook_id)
            )
            if before_id is not None:
                q = q.where(col(Delivery.id) < before_id)
            if state is not None:
                q = q.where(Delivery.state == state)
            if event is not None:
                q = q.where(Delivery.event == event)
            rows = s.exec(
                q.order_by(col(Delivery.webhook_id).desc(), col(Delivery.id).desc()).limit(limit)
            ).all()
            by_delivery: dict[int, list[DeliveryAttempt]] = {d.id: [] for d in rows if d.id is not None}
            if by_delivery:
                for a in s.exec(
                    select(DeliveryAttempt)
                    .where(col(DeliveryAttempt.delivery_id).in_(list(by_delivery)))
                    .order_by(col(DeliveryAttempt.delivery_id), col(DeliveryAttempt.number))
                ).all():
                    by_delivery[a.delivery_id].append(a)
            return [(d, by_delivery[d.id]) for d in rows if d.id is not None]

    def last_deliveries(
        self, webhook_ids: Sequence[int]
    ) -> dict[int, tuple[Delivery, DeliveryAttempt | None]]:
        """Each webhook's newest delivery and that delivery's latest attempt (the dashboard's
        "last outcome" column): one indexed lookup per webhook, a page holds at most 100."""
        out: dict[int, tuple[Delivery, DeliveryAttempt | None]] = {}
        with self.session() as s:
            for wid in webhook_ids:
                d = s.exec(
                    select(Delivery)
                    .where(col(Delivery.webhook_id) >= wid)
                    .where(col(Delivery.webhook_id) <= wid)
                    .order_by(col(Delivery.webhook_id).desc(), col(Delivery.id).desc())
                    .limit(1)
                ).first()
                if d is None or d.id is None:
                    continue
                attempt = s.exec(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == d.id)
                    .order_by(col(DeliveryAttempt.number).desc())
                    .limit(1)
                ).first()
                out[wid] = (d, attempt)
        return out

    def all_webhooks(self, *, limit: int) -> Sequence[Webhook]:
        """Operator view: every team's webhooks, oldest first."""
        with self.session() as s:
            return s.exec(select(Webhook).order_by(col(Webhook.id)).limit(limit)).all()

    def failing_deliveries(self, *, limit: int) -> list[tuple[Delivery, DeliveryAttempt | None, str]]:
        """Operator view: failed and retrying deliveries of every team, newest first, each with
        its latest attempt and its webhook's URL."""
        with self.session() as s:
            rows = s.exec(
                select(Delivery, Webhook.url)
                .join(Webhook, col(Webhook.id) == col(Delivery.webhook_id))
                .where(col(Delivery.state).in_(("failed", "retrying")))
                .order_by(col(Delivery.id).desc())
                .limit(limit)
            ).all()
            latest: dict[int, DeliveryAttempt] = {}
            ids = [d.id for d, _ in rows if d.id is not None]
            if ids:
                for a in s.exec(
                    select(DeliveryAttempt)
                    .where(col(DeliveryAttempt.delivery_id).in_(ids))
                    .order_by(col(DeliveryAttempt.number))
                ).all():
                    latest[a.delivery_id] = a
            return [(d, latest.get(d.id or 0), url) for d, url in rows]

    # --- dashboard sessions -----------------------------------------------------------------

    def add_dashboard_session(self, row: DashboardSession, *, now: datetime) -> None:
        """Store a new session, and drop expired ones while at it (sessions need no sweeper)."""
        with self.session(write=True) as s:
            s.execute(delete(DashboardSession).where(col(DashboardSession.expires_at) < now))
            s.add(row)

    def get_dashboard_session(self, token_hash: str, *, now: datetime) -> DashboardSession | None:
        with self.session() as s:
            row = s.get(DashboardSession, token_hash)
            return row if row is not None and row.expires_at > now else None

    def delete_dashboard_session(self, token_hash: str) -> None:
        with self.session(write=True) as s:
            s.execute(delete(DashboardSession).where(col(DashboardSession.token_hash) == token_hash))

    def get_webhook_by_id(self, webhook_id: int) -> Webhook | None:
        """Operator access (CLI), not scoped to a team."""
        with self.session() as s:
            return s.get(Webhook, webhook_id)


class NewestDeliveryProbe:
    """The newest delivery id of one SQLite file, read on a connection of its own: one index
    descent and no transaction held, cheap enough to ask every few milliseconds from one thread.
    A changed answer means another process recorded work."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def read(self) -> int | None:
        """Raises: sqlite3.Error when the file cannot be read (the connection is then dropped and
        opened again on the next read)."""
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=1.0, check_same_thread=False)
            newest: int | None = self._conn.execute("SELECT max(id) FROM deliveries").fetchone()[0]
            return newest
        except sqlite3.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass(frozen=True)
class Claimed:
    """A leased delivery with everything needed to send it."""

    delivery_id: int
    webhook_id: int
    event: str
    is_test: bool
    attempt_number: int
    url: str
    secrets: tuple[str, ...]  # the current secret first; a rotated-out one while its grace lasts
    payload: bytes
    claim: str  # the claim's token, held in lease_owner until the result is saved


@dataclass(frozen=True)
class AttemptResult:
    delivery_id: int
    claim: str
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_body: str | None
    error: str | None
    state: str
    next_attempt_at: datetime | None
    single_attempt: bool = False  # a test delivery: a failure ends it
