"""Real `justscan-mcp worker` processes on one database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.models import Delivery, DeliveryAttempt
from tests.conftest import child_env, make_team, spawn_worker, stop_process, wait_for
from tests.receiver import Receiver, Reply

pytestmark = pytest.mark.slow


@pytest.fixture
def recorder(db_url: str):
    """An app that records events but runs no dispatcher: the workers under test deliver."""
    app = App.build(Settings(database_url=db_url, allow_private_targets=True))
    app.prepare()
    yield app
    app.close()


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


DISPATCHER_SETTINGS = {
    "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "1",
    "JUSTSCAN_POLL_INTERVAL": "0.05",
    "JUSTSCAN_RETRY_SCHEDULE": "0.2,0.4,0.6",
    "JUSTSCAN_DELIVERY_TIMEOUT": "5",
    "JUSTSCAN_LEASE_MARGIN": "1",
}


def start_worker(db_url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return spawn_worker(child_env(db_url, **(DISPATCHER_SETTINGS | env)), log)


stop = stop_process


def states(app: App, webhook_id: int) -> Counter[str]:
    with app.store.session() as s:
        rows = s.execute(select(Delivery.state).where(Delivery.webhook_id == webhook_id)).scalars().all()
    return Counter(rows)


def attempts_per_delivery(app: App, webhook_id: int) -> Counter[int]:
    with app.store.session() as s:
        rows = s.execute(
            select(DeliveryAttempt.delivery_id, func.count())
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(Delivery.webhook_id == webhook_id)
            .group_by(DeliveryAttempt.delivery_id)
        ).all()
    return Counter({d: n for d, n in rows})


def setup_hook(app: App, receiver: Receiver, path: str):
    kit = make_team(app, "workers")
    hook = app.service.create_webhook(principal=kit.principal(), url=receiver.url(path), events=["scan"])
    receiver.secrets[path] = hook.secret
    return kit, hook


def test_two_dispatchers_deliver_500_events_without_a_duplicate_attempt(db_url, recorder, receiver, tmp_path):
    kit, hook = setup_hook(recorder, receiver, "/pair")
    workers = [start_worker(db_url, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        ids: list[int] = []
        for i in range(500):
            result = recorder.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 7, "scan_id": i + 1}
            )
            ids += result.deliveries  # the first also makes a first_scan, which this webhook does not take
        scan_ids = set(ids)
        assert len(ids) == 500 and len(scan_ids) == 500
        wait_for(lambda: states(recorder, hook.id)["succeeded"] == 500, timeout=120, what="500 deliveries")
        got = Counter(r.headers["x-webhook-delivery"] for r in receiver.at("/pair"))
        assert len(got) == 500 and set(got.values()) == {1}, "a delivery arrived twice"
        assert {int(k) for k in got} == scan_ids
        assert all(r.verified for r in receiver.at("/pair"))
        per = attempts_per_delivery(recorder, hook.id)
        assert len(per) == 500 and set(per.values()) == {1}, "an attempt was made twice"
        with recorder.store.session() as s:
            workers_used = s.execute(
                select(func.count(func.distinct(DeliveryAttempt.worker)))
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.webhook_id == hook.id)
            ).scalar_one()
        # Both dispatchers must have taken part: one doing all the work would pass every check
        # above without testing that two claim side by side without duplicates.
        assert workers_used == 2, f"attempts made by {workers_used} worker(s)"
    finally:
        for w in workers:
            stop(w)


def test_a_worker_killed_mid_batch_loses_nothing(db_url, recorder, receiver, tmp_path):
    kit, hook = setup_hook(recorder, receiver, "/kill")
    receiver.expect("/kill", *[Reply(200, delay=4.0)] * 10)
    # One webhook may take all 10 slots here: the test is about the kill, not about isolation.
    first = start_worker(
        db_url, tmp_path / "first.log", JUSTSCAN_MAX_IN_FLIGHT="10", JUSTSCAN_MAX_IN_FLIGHT_PER_WEBHOOK="10"
    )
    second = None
    try:
        for i in range(30):
            recorder.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 8, "scan_id": i + 1}
            )
        wait_for(
            lambda: len(receiver.at("/kill")) >= 10, timeout=30, what="a batch in flight at the first worker"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        receiver.expect("/kill")  # the receiver answers at once from now on
        assert states(recorder, hook.id)["succeeded"] == 0  # the killed worker saved nothing
        second = start_worker(db_url, tmp_path / "second.log")
        wait_for(
            lambda: states(recorder, hook.id)["succeeded"] == 30,
            timeout=60,
            what="every delivery after the lease",
        )
        arrived = {r.headers["x-webhook-delivery"] for r in receiver.at("/kill")}
        with recorder.store.session() as s:
            all_ids = {
                str(i) for i in s.execute(select(Delivery.id).where(Delivery.webhook_id == hook.id)).scalars()
            }
        assert arrived == all_ids
        per = attempts_per_delivery(recorder, hook.id)
        assert set(per.values()) == {1}  # only the second worker's attempts were saved
        # The 10 the first worker had in flight reached the receiver twice (at least once delivery).
        twice = [
            k
            for k, n in Counter(r.headers["x-webhook-delivery"] for r in receiver.at("/kill")).items()
            if n == 2
        ]
        assert len(twice) == 10
    finally:
        stop(first)
        if second is not None:
            stop(second)


def start_stdio_server(db_url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`serve` over stdio, which runs the dispatcher too; its stdin stays open (a client that
    has not quit), its stderr goes to `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "justscan_mcp", "serve"],
            env=child_env(db_url, **(DISPATCHER_SETTINGS | {"JUSTSCAN_LOG_LEVEL": "info"} | env)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )


@pytest.mark.parametrize("process", ["worker", "stdio serve"])
def test_sigterm_finishes_in_flight_sends_and_marks_only_what_arrived(
    db_url, recorder, receiver, tmp_path, process
):
    """A worker, and `serve` over stdio (an MCP client sends SIGTERM to a server that has not
    exited after stdin closed): no new claims, the sends in flight finish and are saved."""
    kit, hook = setup_hook(recorder, receiver, "/term")
    receiver.expect("/term", *[Reply(200, delay=1.5)] * 5)
    caps = {"JUSTSCAN_MAX_IN_FLIGHT": "5", "JUSTSCAN_MAX_IN_FLIGHT_PER_WEBHOOK": "5"}
    log = tmp_path / "term.log"
    if process == "worker":
        worker = start_worker(db_url, log, **caps)
    else:
        worker = start_stdio_server(db_url, log, JUSTSCAN_API_KEY=kit.rw.key, **caps)
    try:
        for i in range(12):
            recorder.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 9, "scan_id": i + 1}
            )
        wait_for(lambda: len(receiver.at("/term")) >= 5, timeout=30, what="5 sends in flight")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0, log.read_text()
    finally:
        stop(worker)
    counts = states(recorder, hook.id)
    arrived = {r.headers["x-webhook-delivery"] for r in receiver.at("/term")}
    with recorder.store.session() as s:
        succeeded = {
            str(i)
            for i in s.execute(
                select(Delivery.id).where(Delivery.webhook_id == hook.id).where(Delivery.state == "succeeded")
            ).scalars()
        }
        leased = s.execute(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.webhook_id == hook.id)
            .where(Delivery.lease_owner.is_not(None))
        ).scalar_one()
    assert counts["succeeded"] >= 5  # the in-flight sends finished and were saved
    assert succeeded <= arrived  # nothing is marked delivered that did not arrive
    assert counts["succeeded"] + counts["pending"] == 12 and leased == 0
    assert "finishing in-flight deliveries" in log.read_text()
