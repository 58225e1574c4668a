"""The database adapter: engine setup for SQLite and PostgreSQL, and the queries the service needs.

The service talks to `Store` only; SQLAlchemy exceptions are translated here (`StoreUnavailable`,
`Conflict`) so nothing above this module knows the driver. Methods are synchronous and short;
async front ends call the service through a worker thread so the event loop never waits on IO.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlmodel import Session, SQLModel, col, select

from justscan_mcp.errors import Conflict, StoreUnavailable
from justscan_mcp.models import ApiKey, InstanceSecret, Team, Webhook
from justscan_mcp.security import generate_instance_key

log = logging.getLogger(__name__)
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the one writer; busy_timeout makes writers queue instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_db_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file's directory when needed."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class Store:
    """Queries over one database. Every method opens and closes its own short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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
    def session(self) -> Iterator[Session]:
        """A session whose commit happens on clean exit.

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
                session.commit()
        except (OperationalError, SAInterfaceError) as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc

    def create_schema(self) -> None:
        """Create missing tables (idempotent)."""
        try:
            SQLModel.metadata.create_all(self.engine)
        except IntegrityError:
            # Another process created the same tables at the same moment (PostgreSQL catalogue race).
            SQLModel.metadata.create_all(self.engine)
        except (OperationalError, SAInterfaceError) as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig or exc}") from exc

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
        except IntegrityError:
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
        except IntegrityError:
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
        with self.session() as s:
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
                .where(Webhook.team_id == team_id)
                .where(col(Webhook.id) > after_id)
                .order_by(col(Webhook.id))
                .limit(limit)
            ).all()

    def delete_webhook(self, *, team_id: int, webhook_id: int) -> bool:
        with self.session() as s:
            result = s.execute(
                delete(Webhook).where(col(Webhook.id) == webhook_id).where(col(Webhook.team_id) == team_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]
