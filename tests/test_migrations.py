"""Schema migrations: the models and the migrations agree, on both backends; upgrades are
idempotent and safe to run concurrently; PostgreSQL servers wait for `db upgrade`."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.models import Delivery
from justscan_mcp.store import Store, normalise_url
from tests.conftest import child_env


def test_head_constant_is_alembics_head(db_url: str):
    from justscan_mcp.migrations import HEAD

    store = Store.from_url(db_url)
    try:
        assert store.schema_revision() == (HEAD, HEAD)
    finally:
        store.close()


def test_models_and_migrations_agree(db_url: str):
    store = Store.from_url(db_url)
    try:
        store.migrate()
        with store.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
        assert diff == [], f"models and migrations differ; add a revision: {diff}"
        current, head = store.schema_revision()
        assert current == head
    finally:
        store.close()


def test_the_models_partial_indexes_are_the_databases(db_url: str):
    """The models declare the partial indexes' predicate once (for SQLite) and the store adds the
    PostgreSQL one when it opens PostgreSQL: on each backend, an index is partial in the models
    exactly when it is partial in the migrated database. Alembic's comparison does not look at
    predicates, so this is the check that the PostgreSQL ones are there."""
    store = Store.from_url(db_url)
    try:
        store.migrate()
        backend = store.backend
        reflected = {
            ix["name"]: ix.get("dialect_options", {}).get(f"{backend}_where")
            for ix in inspect(store.engine).get_indexes("deliveries")
        }
        declared = {ix.name: ix.dialect_options[backend]["where"] for ix in Delivery.__table__.indexes}
        assert reflected.keys() == declared.keys()
        partial = {name for name, where in declared.items() if where is not None}
        assert partial == {"ix_deliveries_open", "ix_deliveries_failing"}
        assert partial == {name for name, where in reflected.items() if where is not None}
    finally:
        store.close()


@pytest.fixture
def empty_db(db_url: str, tmp_path):
    """A database with no schema at all, of the same backend."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    admin = create_engine(
        normalise_url(db_url).rsplit("/", 1)[0] + "/postgres",
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=True,
    )
    name = f"justscan_empty_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield normalise_url(db_url).rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_concurrent_upgrades_take_turns(empty_db: str):
    errors: list[BaseException] = []

    def upgrade() -> None:
        store = Store.from_url(empty_db)
        try:
            store.migrate()
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = Store.from_url(empty_db)
    try:
        current, head = store.schema_revision()
        assert current == head
    finally:
        store.close()


def test_db_upgrade_command_and_what_each_backend_does_without_it(empty_db: str):
    store = Store.from_url(empty_db)
    try:
        if empty_db.startswith("sqlite"):
            store.create_schema()  # the embedded default migrates itself
            assert store.schema_revision()[0] is not None
        else:
            with pytest.raises(StoreUnavailable, match="db upgrade"):
                store.create_schema()  # PostgreSQL waits for the operator
    finally:
        store.close()
    proc = subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "db", "upgrade", "--json"],
        env=child_env(empty_db),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "db", "upgrade"],
        env=child_env(empty_db),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "already current" in again.stdout
    store = Store.from_url(empty_db)
    try:
        store.create_schema()
    finally:
        store.close()


def test_revisions_are_frozen_in_time():
    """A revision imports no live project code: renaming or changing a model type later must not
    break the revisions that created the old schema (0001 and 0003 imported models.UTCDateTime)."""
    import ast
    from pathlib import Path

    import justscan_mcp.migrations

    versions = Path(justscan_mcp.migrations.__file__).with_name("versions")
    sources = [*sorted(versions.glob("0*.py")), versions.parent / "script.py.mako"]
    assert len(sources) >= 5
    for path in sources:
        text_ = path.read_text()
        if path.suffix == ".mako":
            assert "justscan_mcp" not in text_, path.name
            continue
        for node in ast.walk(ast.parse(text_)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "justscan_mcp" for n in names), f"{path.name} imports {names}"
        assert "justscan_mcp." not in text_, path.name


def test_0012_fills_in_the_webhook_and_outcome_of_existing_attempts(empty_db: str):
    """Attempts written before 0012 get their webhook and outcome class, so statistics count them."""
    from alembic import command

    store = Store.from_url(empty_db)
    try:
        with store.engine.begin() as c:
            command.upgrade(store._alembic(c), "0011")
        stamp = "2026-11-29 10:00:00"
        with store.engine.begin() as c:
            c.execute(text(f"INSERT INTO teams (id, name, created_at) VALUES (1, 't', '{stamp}')"))
            c.execute(
                text(
                    "INSERT INTO webhooks (id, team_id, url, events, secret, active, created_at, updated_at)"
                    f" VALUES (7, 1, 'https://x.test/', '[\"scan\"]', 's', true, '{stamp}', '{stamp}')"
                )
            )
            c.execute(
                text(
                    f"INSERT INTO events (id, team_id, name, payload, created_at) VALUES (1, 1, 'scan', '{{}}', '{stamp}')"
                )
            )
            c.execute(
                text(
                    "INSERT INTO deliveries (id, team_id, webhook_id, event_id, event, state, is_test, attempt_count,"
                    f" created_at, updated_at) VALUES (1, 1, 7, 1, 'scan', 'failed', false, 3, '{stamp}', '{stamp}')"
                )
            )
            for n, status, error in [
                (1, "503", "'receiver answered HTTP 503'"),
                (2, "NULL", "'timed out after 10s'"),
                (3, "NULL", "'connection failed: reset'"),
            ]:
                c.execute(
                    text(
                        "INSERT INTO delivery_attempts (delivery_id, number, started_at, duration_ms, status_code, error)"
                        f" VALUES (1, {n}, '{stamp}', 5, {status}, {error})"
                    )
                )
        store.migrate()
        with store.engine.connect() as c:
            rows = c.execute(
                text("SELECT number, webhook_id, outcome FROM delivery_attempts ORDER BY number")
            ).all()
        assert [tuple(r) for r in rows] == [(1, 7, "5xx"), (2, 7, "timeout"), (3, 7, "connection")]
    finally:
        store.close()
