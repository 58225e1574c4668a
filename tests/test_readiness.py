"""Readiness knows the dispatcher: a wedged claim loop turns /readyz to 503 with a reason and
stops the process's heartbeat in the database; so does a schema that is not at head."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import child_env, make_team, spawn_server, wait_for
from tests.test_delivery import until
from tests.test_faults import emit, hook, running

pytestmark = pytest.mark.anyio


async def test_a_wedged_claim_loop_is_unready_and_stops_beating(db_url: str):
    async with running(db_url) as app:
        await until(lambda: anyio.from_thread.run(app.unready_reason) is None, what="ready")
        dispatcher = app.dispatcher
        await until(
            lambda: dispatcher.worker_id in [b.worker_id for b in app.service.live_dispatchers()],
            what="the first heartbeat",
        )
        # Wedge it on purpose: the next claim never returns (a database call that hangs).
        gate = threading.Event()
        real_claim = app.store.claim_due

        def stuck(**kwargs):
            gate.wait(30)
            return real_claim(**kwargs)

        app.store.claim_due = stuck  # type: ignore[method-assign]
        try:
            kit = make_team(app, "wedge")
            hook(kit, "https://93.184.216.34/never")  # nothing is sent: the claim hangs first
            emit(app, kit)
            reason = await until(
                lambda: anyio.from_thread.run(app.unready_reason), timeout=10, what="unready"
            )
            assert "claim loop has not turned" in reason
            (beat,) = [b for b in app.store.dispatcher_beats() if b.worker_id == dispatcher.worker_id]
            await anyio.sleep(3 * app.settings.poll_interval)  # three beats' time, with the loop stuck
            (later,) = [b for b in app.store.dispatcher_beats() if b.worker_id == dispatcher.worker_id]
            assert later.last_beat_at == beat.last_beat_at, "a wedged dispatcher kept beating"
            # The admin area's list of live dispatchers drops it once three beats are missed.
            await until(
                lambda: dispatcher.worker_id not in [b.worker_id for b in app.service.live_dispatchers()],
                what="the wedged dispatcher to leave the live list",
            )
        finally:
            gate.set()
            app.store.claim_due = real_claim  # type: ignore[method-assign]
        await until(lambda: anyio.from_thread.run(app.unready_reason) is None, what="ready again")
    assert not any(b.worker_id == dispatcher.worker_id for b in app.store.dispatcher_beats())  # gone at stop


def test_readyz_over_http_and_a_schema_behind_head(tmp_path: Path):
    db = tmp_path / "ready.db"
    url = f"sqlite:///{db}"
    log = tmp_path / "server.log"
    with spawn_server(child_env(url), log) as server:
        wait_for(lambda: httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200, what="ready")
        assert httpx.get(f"{server.base}/readyz", timeout=5).json() == {
            "status": "ready",
            "database": "sqlite",
        }
        import sqlite3

        with sqlite3.connect(db) as conn:
            (head,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            conn.execute("UPDATE alembic_version SET version_num = '0001'")
        r = httpx.get(f"{server.base}/readyz", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "unready" and "schema" in r.json()["reason"]
        assert httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200  # alive, not ready
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE alembic_version SET version_num = ?", (head,))
        assert httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200
