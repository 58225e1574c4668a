"""Scale-out on PostgreSQL with real processes: N HTTP servers (--no-dispatcher) and M workers on
one database, and the faults operators meet. Deliveries go only to the local receiver."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.models import Delivery, DeliveryAttempt
from justscan_mcp.store.outbox import NOTIFY_CHANNEL
from tests.conftest import (
    child_env,
    free_port,
    make_team,
    spawn_server,
    spawn_worker,
    stop_process,
    wait_for,
)
from tests.receiver import Receiver, Reply

pytestmark = pytest.mark.slow

FAST = {
    "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "1",
    "JUSTSCAN_RETRY_SCHEDULE": "0.2,0.4,0.6",
    "JUSTSCAN_DELIVERY_TIMEOUT": "3",
    "JUSTSCAN_LEASE_MARGIN": "1",
}


@pytest.fixture
def app(pg_url: str) -> Iterator[App]:
    application = App.build(Settings(database_url=pg_url, allow_private_targets=True))
    application.prepare()
    yield application
    application.close()


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@contextlib.contextmanager
def workers(pg_url: str, tmp_path: Path, n: int, **env: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    try:
        for i in range(n):
            procs.append(spawn_worker(child_env(pg_url, **(FAST | env)), tmp_path / f"worker{i}.log"))
        yield procs
    finally:
        for p in procs:  # SIGTERM all first: they finish their in-flight sends in parallel
            if p.poll() is None:
                p.terminate()
        for p in procs:
            stop_process(p)


def listening(app: App) -> int:
    """How many connections of this database wait on the dispatchers' LISTEN channel."""
    with app.store.session() as s:
        return int(
            s.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query = :listen"
                ),
                {"listen": f"LISTEN {NOTIFY_CHANNEL}"},
            ).scalar_one()
        )


def delivery_states(app: App, webhook_ids: list[int]) -> Counter[str]:
    with app.store.session() as s:
        return Counter(
            s.execute(select(Delivery.state).where(Delivery.webhook_id.in_(webhook_ids))).scalars().all()
        )


def attempts_by_delivery(app: App, webhook_ids: list[int]) -> Counter[int]:
    with app.store.session() as s:
        rows = s.execute(
            select(DeliveryAttempt.delivery_id, func.count())
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(Delivery.webhook_id.in_(webhook_ids))
            .group_by(DeliveryAttempt.delivery_id)
        ).all()
    return Counter(dict(rows))


# One client for every post: a client per request (`httpx.post`) builds an SSL context each
# time, ~30 ms of CPU here: the 2,000-event test's poster took 47 s of its 51 (12-15 s in all now).
# httpx.Client is thread-safe; a connection to a server that went away fails and is retried.
CLIENT = httpx.Client(limits=httpx.Limits(max_connections=16))


def post_event(base: str, key: str, data: dict, *, retry_for: float = 0.0) -> httpx.Response:
    """POST /events, retrying on 503/connection errors for up to `retry_for` seconds (what a
    client does while the database restarts)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            r = CLIENT.post(
                f"{base}/api/v1/events",
                json={"event": "scan", "data": data},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            if r.status_code != 503 or time.monotonic() > deadline:
                return r
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_two_servers_three_workers_2000_events_50_webhooks(pg_url, app, receiver, tmp_path):
    teams = [make_team(app, f"scale{i}") for i in range(50)]
    hooks, keys = [], []
    for i, kit in enumerate(teams):
        hook = app.service.create_webhook(
            principal=kit.principal(), url=receiver.url(f"/s{i}"), events=["scan"]
        )
        receiver.secrets[f"/s{i}"] = hook.secret
        hooks.append(hook.id)
        keys.append(kit.key(scopes=["events:write"]).key)
    env = child_env(pg_url, **FAST)
    with (
        spawn_server(env, tmp_path / "a.log", "--no-dispatcher") as a,
        spawn_server(env, tmp_path / "b.log", "--no-dispatcher") as b,
        workers(pg_url, tmp_path, 3),
    ):
        servers = [a.base, b.base]

        def emit(i: int) -> list[int]:
            r = post_event(servers[i % 2], keys[i % 50], {"qr_code_id": i + 1, "scan_id": i + 1})
            assert r.status_code == 202, r.text
            return r.json()["deliveries"]

        with ThreadPoolExecutor(8) as pool:
            ids = [d for ds in pool.map(emit, range(2000)) for d in ds]
        assert len(ids) == 2000 == len(set(ids))
        wait_for(
            lambda: delivery_states(app, hooks)["succeeded"] == 2000, timeout=180, what="2000 deliveries"
        )
    arrived = Counter(r.headers["x-webhook-delivery"] for r in receiver.received)
    assert set(arrived) == {str(i) for i in ids}
    assert max(arrived.values()) == 1, "a delivery arrived twice"
    assert all(r.verified for r in receiver.received)
    per = attempts_by_delivery(app, hooks)
    assert len(per) == 2000 and set(per.values()) == {1}, "an attempt was made twice"
    with app.store.session() as s:
        by_worker = Counter(
            s.execute(
                select(DeliveryAttempt.worker)
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.webhook_id.in_(hooks))
            ).scalars()
        )
    print(f"attempts per worker: {sorted(by_worker.values())}")
    assert len(by_worker) >= 2  # the work was shared


def test_an_event_recorded_by_a_server_wakes_a_separate_worker_at_once(pg_url, app, receiver, tmp_path):
    kit = make_team(app, "notify")
    hook = app.service.create_webhook(principal=kit.principal(), url=receiver.url("/notify"), events=["scan"])
    key = kit.key(scopes=["events:write"]).key
    env = child_env(pg_url, **FAST)
    with (
        spawn_server(env, tmp_path / "s.log", "--no-dispatcher") as server,
        workers(pg_url, tmp_path, 1, JUSTSCAN_POLL_INTERVAL="30"),
    ):
        wait_for(lambda: "started" in (tmp_path / "worker0.log").read_text(), what="worker up")
        # From here NOTIFY can wake it, and with a 30 s poll interval nothing else gets these
        # events out in time (its first claim, made as it starts, might still take the first).
        wait_for(lambda: listening(app) >= 1, what="the worker listening")
        latencies = []
        for i in range(5):
            before = len(receiver.at("/notify"))
            sent = time.monotonic()
            assert post_event(server.base, key, {"qr_code_id": 900 + i, "scan_id": i + 1}).status_code == 202
            wait_for(
                lambda b=before: len(receiver.at("/notify")) > b, timeout=10, interval=0.002, what="delivery"
            )
            latencies.append(receiver.at("/notify")[-1].at - sent)
    print(
        f"record -> arrival across processes: {[round(x * 1000, 1) for x in latencies]} ms (poll interval 30 s)"
    )
    assert max(latencies) < 5.0, "the worker waited for its poll interval instead of being notified"
    assert len(receiver.at("/notify")) == 5 and hook.id


def test_sigkill_a_worker_with_deliveries_in_flight(pg_url, app, receiver, tmp_path):
    kit = make_team(app, "killpg")
    hook = app.service.create_webhook(principal=kit.principal(), url=receiver.url("/k"), events=["scan"])
    receiver.secrets["/k"] = hook.secret
    receiver.expect("/k", *[Reply(200, delay=3.0)] * 8)
    # One webhook may take all 8 slots here: the test is about the kill, not about isolation.
    with workers(pg_url, tmp_path, 1, JUSTSCAN_MAX_IN_FLIGHT="8", JUSTSCAN_MAX_IN_FLIGHT_PER_WEBHOOK="8") as (
        victim,
    ):
        wait_for(lambda: "started" in (tmp_path / "worker0.log").read_text(), what="victim up")
        victim_id = re.search(r"dispatcher (\S+) started", (tmp_path / "worker0.log").read_text()).group(1)
        for i in range(20):
            app.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 50_000 + i, "scan_id": i + 1}
            )
        wait_for(lambda: len(receiver.at("/k")) >= 8, what="8 sends in flight")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    receiver.expect("/k")
    survivors = tmp_path / "survivors"
    survivors.mkdir()
    with workers(pg_url, survivors, 2):
        wait_for(
            lambda: delivery_states(app, [hook.id])["succeeded"] == 20,
            timeout=60,
            what="all 20 after the lease",
        )
    with app.store.session() as s:
        savers = set(
            s.execute(
                select(DeliveryAttempt.worker)
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.webhook_id == hook.id)
            ).scalars()
        )
    assert victim_id not in savers and len(savers) >= 1  # the log shows who delivered
    seen = Counter(r.headers["x-webhook-delivery"] for r in receiver.at("/k"))
    assert len(seen) == 20 and sum(1 for n in seen.values() if n == 2) == 8  # the 8 in flight went out again


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        timeout=120,
    )
    wait_for(
        lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0,
        timeout=60,
        what="PostgreSQL back",
    )


@pytest.mark.serial
def test_restart_postgres_while_deliveries_are_flowing(pg_url, app, receiver, tmp_path):
    if not Path("/etc/postgresql").is_dir():
        pytest.skip("needs the local PostgreSQL cluster")
    kit = make_team(app, "restart")
    hook = app.service.create_webhook(principal=kit.principal(), url=receiver.url("/r"), events=["scan"])
    receiver.secrets["/r"] = hook.secret
    key = kit.key(scopes=["events:write"]).key
    env = child_env(pg_url, **FAST)
    accepted: list[int] = []
    with spawn_server(env, tmp_path / "s.log", "--no-dispatcher") as server, workers(pg_url, tmp_path, 2):
        # Both listening before the restart: a worker still starting when PostgreSQL went down
        # only retried its first connection, and had no LISTEN connection to lose (seen run alone).
        wait_for(lambda: listening(app) >= 2, what="both workers listening")
        for i in range(300):
            if i == 100:
                restart_postgres()
            r = post_event(server.base, key, {"qr_code_id": 70_000 + i, "scan_id": i + 1}, retry_for=60)
            assert r.status_code == 202, r.text
            accepted += r.json()["deliveries"]
        wait_for(
            lambda: delivery_states(app, [hook.id])["succeeded"] == 300,
            timeout=120,
            what="all 300 after the restart",
        )
        assert httpx.get(f"{server.base}/healthz").status_code == 200
    arrived = {r.headers["x-webhook-delivery"] for r in receiver.at("/r")}
    assert arrived == {str(i) for i in accepted}
    assert all(r.verified for r in receiver.at("/r"))
    worker_logs = sorted(tmp_path.glob("worker*.log"))
    assert len(worker_logs) == 2
    for path in worker_logs:
        lines = path.read_text().splitlines()
        outage = [line for line in lines if "retrying" in line or "LISTEN" in line or "listening" in line]
        print(f"{path.name} lines about the outage:", outage[:6])
        # Each worker noticed the restart and came back by itself, and said both in its log.
        assert any("LISTEN connection lost" in line for line in lines), path.name
        assert any("listening for new work again" in line for line in lines), path.name


def test_receiver_down_longer_than_the_schedule_then_redeliver(pg_url, app, tmp_path):
    port = free_port()
    kit = make_team(app, "down")
    hook = app.service.create_webhook(
        principal=kit.principal(), url=f"http://127.0.0.1:{port}/late", events=["scan"]
    )
    key = kit.key(scopes=["webhooks:read", "webhooks:write"]).key
    env = child_env(pg_url, **FAST)
    with spawn_server(env, tmp_path / "s.log", "--no-dispatcher") as server, workers(pg_url, tmp_path, 2):
        sent = app.service.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 1, "scan_id": 1})
        wait_for(lambda: delivery_states(app, [hook.id])["failed"] == 1, timeout=30, what="failed")
        api = {"Authorization": f"Bearer {key}"}
        log = httpx.get(f"{server.base}/api/v1/webhooks/{hook.id}/deliveries", headers=api).json()[
            "deliveries"
        ]
        (d,) = log
        assert d["state"] == "failed" and len(d["attempts"]) == 4
        assert all("connection failed" in a["error"] for a in d["attempts"])
        assert [a["number"] for a in d["attempts"]] == [1, 2, 3, 4]
        # The receiver comes back on the same port; a redelivery now succeeds.
        with Receiver(port=port) as late:
            r = httpx.post(f"{server.base}/api/v1/deliveries/{sent.deliveries[0]}/redeliver", headers=api)
            assert r.status_code == 201
            wait_for(lambda: delivery_states(app, [hook.id])["succeeded"] == 1, timeout=30, what="redelivery")
            assert len(late.received) == 1
