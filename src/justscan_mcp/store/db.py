"""The database connector: engines, transactions, driver-error translation, migrations.

Engine and pool set-up for SQLite and PostgreSQL, transactions (SQLite BEGIN IMMEDIATE for
writers), the translation of driver errors into the error tree, and the Alembic hook.

Every repository of the store (`outbox`, `access`, `webhooks`, `deliveries`) is a small class on
top of `Database` and uses only what it defines here: `session()` for ORM work, `_driver()` for
the hot path's driver SQL, and the clock and placeholder helpers. None of them uses another.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError, InvalidatePoolError, OperationalError, ProgrammingError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlmodel import Session, select

from justscan_mcp.errors import Conflict, InvalidInput, StoreUnavailable
from justscan_mcp.migrations import HEAD
from justscan_mcp.models import (
    InstanceSecret,
    UTCDateTime,
    declare_postgresql_predicates,
)
from justscan_mcp.security import generate_instance_key

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent.parent / "migrations"
MIGRATION_LOCK = 0x6A757374  # "just": one advisory-lock key for schema changes

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
# As long as SQLite's own busy_timeout (PRAGMA below): a writer waits no longer in the queue.
SQLITE_WRITE_WAIT = 30.0
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
    # In the URL, so the dispatcher's LISTEN connection has them too; the URL's own values win.
    parsed = parsed.update_query_dict({k: v for k, v in PG_CONNECTION.items() if k not in parsed.query})
    engine = create_engine(parsed, pool_size=10, max_overflow=10)
    _ping_when_idle(engine)
    declare_postgresql_predicates()
    return engine


# Seconds a new PostgreSQL connection may take, handshake and authentication included, before
# it counts as an outage (StoreUnavailable). libpq waits for ever by default: a host that
# accepted the connection and then said nothing (hung, or a proxy before a dead server) held
# every caller's thread, the claim and the start.
CONNECT_TIMEOUT = 10

# libpq parameters of every PostgreSQL connection unless the URL sets them. A host that vanishes
# without a reset (a partition, a failover that moves the address) is noticed within a minute:
# data unacknowledged for 30 s fails the call (otherwise the kernel retransmits for about 15
# minutes), and an idle connection, such as the dispatcher's LISTEN, is probed after 30 s of
# silence (otherwise after two hours).
PG_CONNECTION = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

# A pooled connection back in use within this many seconds is not pinged first (HikariCP's
# "alive bypass window" is 500 ms too).
PING_AFTER_IDLE = 0.5


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat idle for PING_AFTER_IDLE or more.

    SQLAlchemy's pre-ping is a round trip before every transaction. Under load that was one
    round trip in three of the dispatcher's claim, each a wait for a CPU beside the sends and
    the receiver; a connection used a moment ago tells nothing new. A connection that sat idle
    (the database may have restarted meanwhile) is pinged as before, and a dead one drops every
    connection pooled before it, as the pre-ping does. A restart under constant load is found
    by the statement that meets it instead: that transaction fails (StoreUnavailable; the
    dispatcher and the request's caller retry) and the pool starts over."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                raise InvalidatePoolError(str(exc)) from exc
            raise


def _stuck_in_pipeline(raw: Any) -> bool:
    """Whether a failed transaction left its psycopg connection in pipeline mode though the
    server has not (yet, to psycopg) closed it: a stop that reaches a pipeline after psycopg has
    read the server's AdminShutdown but not the close. psycopg then cannot leave pipeline mode
    ("while busy"), and the connection is not marked broken, so SQLAlchemy would not know to
    drop it. SQLite's connections have no pipeline."""
    pgconn = getattr(raw, "pgconn", None)
    return pgconn is not None and not raw.broken and int(pgconn.pipeline_status) != 0


class Database:
    """One engine and what every transaction shares. Methods open and close their own short
    transaction."""

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
        # SQLite has one writer at a time. This process's write transactions queue on a lock of
        # its own, so the next one starts the moment the last commits: waiting in SQLite's busy
        # handler instead sleeps in growing steps (up to 100 ms) and then polls, which cost 4
        # concurrent 1,000-event batches a fifth of their rate (17.5k events/s against 21.7k for
        # one client) and a p99 of 1.6 s. Other processes still meet in busy_timeout.
        self._sqlite_writer = threading.Lock() if engine.dialect.name == "sqlite" else None
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
    def from_url(cls, url: str) -> Self:
        return cls(create_db_engine(url))

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def session(self, *, write: bool = False, snapshot: bool = False) -> Iterator[Session]:
        """A session whose commit happens on clean exit. `write=True` for a transaction that
        reads and then writes (SQLite takes the write lock at BEGIN).

        `snapshot=True` for a read in several statements that must see one moment (a delivery,
        then its attempts). SQLite's deferred BEGIN already pins one WAL snapshot at the first
        read; PostgreSQL's default READ COMMITTED gives every statement its own, so a result saved
        between the two reads came back as a leased delivery with attempt_count 0 beside the
        attempt that ended it. REPEATABLE READ fixes the moment at the first statement, and a
        transaction that only reads never fails on serialization there.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        with self._transaction(write=write), Session(self.engine, expire_on_commit=False) as session:
            if snapshot and self.backend == "postgresql":
                # Before the first statement; the pool resets it when the connection goes back.
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
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
        queued = write and self._sqlite_writer is not None
        if queued and not self._sqlite_writer.acquire(timeout=SQLITE_WRITE_WAIT):  # type: ignore[union-attr]
            raise StoreUnavailable(
                "database unavailable: database is locked (another writer of this process)"
            )
        mode = _sqlite_begin.set("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except (OperationalError, SAInterfaceError) as exc:
            if _is_programming_error(exc.orig):
                raise
            raise StoreUnavailable(f"database unavailable: {self._reason(exc)}") from exc
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
            raise StoreUnavailable(f"database unavailable: {self._reason(exc)}") from exc
        finally:
            _sqlite_begin.reset(mode)
            if queued:
                self._sqlite_writer.release()  # type: ignore[union-attr]

    def _reason(self, exc: BaseException) -> str:
        """What the database said first. A failure can bring more failures while it is handled
        (psycopg's "cannot exit pipeline mode" over the server's AdminShutdown, then the
        ROLLBACK on the dead connection), and the last says least: name the first, then the
        last."""
        last = getattr(exc, "orig", None) or exc
        first, node = last, exc.__context__
        while node is not None:
            if isinstance(node, self._driver_errors):
                first = node
            node = node.__context__
        return str(last) if first is last else f"{first} (then: {last})"

    # --- schema -----------------------------------------------------------------------------

    def _alembic(self, connection: Any) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self, *, on_step: Callable[[str], None] | None = None) -> None:
        """Bring the schema to the newest revision (idempotent). Concurrent callers take turns:
        PostgreSQL holds an advisory lock for the transaction, SQLite its write lock.
        `on_step` is told each revision as it is applied.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        from alembic import command

        token = _sqlite_begin.set("BEGIN IMMEDIATE")
        try:
            with self.engine.begin() as connection:
                if self.backend == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
                cfg = self._alembic(connection)
                if on_step is not None:
                    cfg.attributes["on_version_apply"] = lambda **kw: on_step(kw["step"].up_revision_id)
                command.upgrade(cfg, "head")
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

    def revisions_after(self, revision: str | None) -> list[str]:
        """The revisions an upgrade from `revision` (None: an empty database) applies, oldest first."""
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(self._alembic(None))
        steps = [r.revision for r in script.iterate_revisions("head", revision or "base")]
        return list(reversed(steps))

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

    def schema_is_current(self) -> bool:
        """Whether the stored revision is this code's head (one small read, no Alembic load).

        Raises:
            StoreUnavailable.
        """
        return self._stored_revision() == HEAD

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

    @contextmanager
    def _driver(self, *, write: bool, snapshot: bool = False) -> Iterator[Any]:
        """A DBAPI cursor in one transaction, committed on clean exit. `snapshot=True` for a
        read in several statements that must see one moment (see `session`).

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        with self._transaction(write=write), self.engine.connect() as conn:
            if snapshot and self.backend == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                raw = conn.connection.driver_connection
                cur = raw.cursor()  # type: ignore[union-attr]
                try:
                    yield cur
                except BaseException:
                    if _stuck_in_pipeline(raw):
                        # Closed before the transaction's ROLLBACK, which then meets a closed
                        # connection: a disconnect to SQLAlchemy, which drops it and every
                        # connection pooled before it, as for one the server closed. Left open,
                        # the ROLLBACK failed, the pool's reset failed again and was logged as an
                        # ERROR, and the connection could come back from the pool.
                        raw.close()  # type: ignore[union-attr]
                    raise
                finally:
                    cur.close()

    @staticmethod
    def _json_result(value: Any) -> Any:
        """A JSON column read by driver SQL: SQLite's driver gives its text, psycopg parses it."""
        return json.loads(value) if isinstance(value, str) else value

    def _decoded(
        self,
        columns: Sequence[str],
        row: Sequence[Any],
        *,
        json_columns: Sequence[str],
        time_columns: Sequence[str],
    ) -> dict[str, Any]:
        """A driver row as {column: value}, its JSON and UTC time columns converted as the ORM's
        column types would."""
        found = dict(zip(columns, row, strict=True))
        for name in json_columns:
            found[name] = self._json_result(found[name])
        for name in time_columns:
            found[name] = self._dt_result(found[name])
        return found

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
