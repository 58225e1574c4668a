"""What an operator sees: `operations_status` against a hand-counted fixture on both databases,
`justscan-mcp status` (once, --json, --watch), /metrics of a serve and a worker scraped during
real traffic and checked against the delivery log, the takeover of a dead worker's deliveries,
the log lines of a PostgreSQL outage, and progress output."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.models import Delivery, DeliveryAttempt, Event, Webhook, outcome_class, utcnow
from justscan_mcp.progress import Progress
from justscan_mcp.store import AttemptResult
from tests.conftest import (
    child_env,
    free_port,
    make_team,
    missing,
    own_database,
    own_pg_database,
    spawn_server,
    spawn_worker,
    stop_process,
    stub_resolver,
    wait_for,
)
from tests.receiver import Receiver, Reply
from tests.test_faults_processes import postgres

NOW = datetime(2026, 11, 29, 15, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own: the operator's figures count across every team."""
    with own_database(request, request.param, tmp_path, "justscan_obs") as url:
        yield url


@pytest.fixture
def own_pg(pg_base_url: str | None) -> Iterator[str]:
    """PostgreSQL only, a database of its own (counters must count only this test's work)."""
    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")
    with own_pg_database(pg_base_url, "justscan_obs") as url:
        yield url


def _app(url: str, **settings: object) -> App:
    app = App.build(Settings(database_url=url, **settings), resolver=stub_resolver)  # type: ignore[arg-type]
    app.prepare()
    return app


# --- operations_status: one service function for status, the admin area and /metrics ----------


def test_operations_status_matches_a_hand_counted_fixture(fresh_url: str, monkeypatch: pytest.MonkeyPatch):
    app = _app(fresh_url)
    monkeypatch.setattr(app.service, "clock", lambda: NOW)
    kit = make_team(app, "ops")
    p = kit.principal()
    a = app.service.create_webhook(principal=p, url="https://hooks.example.test/a", events=["scan"])
    b = app.service.create_webhook(
        principal=p, url="https://hooks.example.test/b", events=["scan"], rate_limit=5
    )
    c = app.service.create_webhook(principal=p, url="https://hooks.example.test/c", events=["scan"])
    streak = NOW - timedelta(hours=2)
    with app.store.session(write=True) as s:
        for hook_id, values in (
            (a.id, {"failing_since": streak}),
            (c.id, {"failing_since": streak, "active": False, "disabled_reason": "failing"}),
        ):
            row = s.get(Webhook, hook_id)
            assert row is not None
            for k, v in values.items():
                setattr(row, k, v)
            s.add(row)
        event = Event(team_id=kit.team.id, name="scan", payload="{}", created_at=NOW - timedelta(hours=1))
        s.add(event)
        s.flush()

        def delivery(hook: int, state: str, due: timedelta | None, lease: timedelta | None = None, **kw):
            d = Delivery(
                team_id=kit.team.id,
                webhook_id=hook,
                event_id=event.id,
                event="test" if kw.get("is_test") else "scan",
                state=state,
                next_attempt_at=NOW + due if due is not None else None,
                lease_owner="someone" if lease is not None else None,
                lease_expires_at=NOW + lease if lease is not None else None,
                created_at=NOW - timedelta(hours=1),
                updated_at=NOW - timedelta(hours=1),
                **kw,
            )
            s.add(d)
            s.flush()
            return d

        delivery(a.id, "pending", -timedelta(minutes=10))
        delivery(a.id, "retrying", timedelta(minutes=5))  # open, not yet due
        delivery(a.id, "pending", -timedelta(minutes=20), lease=timedelta(minutes=1))  # being sent
        delivery(b.id, "pending", -timedelta(minutes=30))  # waits for its rate limit
        delivery(a.id, "pending", -timedelta(minutes=40), is_test=True)  # a test delivery
        delivery(a.id, "pending", -timedelta(minutes=50), lease=-timedelta(minutes=1))  # lease expired: due
        history = {
            a.id: [("2xx", 1), ("2xx", 2), ("2xx", 3), ("5xx", 4), ("5xx", 4.5), ("4xx", 10)],
            b.id: [("timeout", 1), ("connection", 2), ("connection", 3), ("connection", 3.5)],
            c.id: [("4xx", 0.5)],
        }
        codes = {"2xx": 200, "4xx": 404, "5xx": 500, "timeout": None, "connection": None}
        for hook, tries in history.items():
            d = delivery(hook, "failed", None)
            for n, (cls, minutes_ago) in enumerate(tries, 1):
                error = {"timeout": "timed out after 10s", "connection": "connection failed: refused"}.get(
                    cls
                )
                assert outcome_class(codes[cls], error) == cls
                s.add(
                    DeliveryAttempt(
                        delivery_id=d.id,
                        webhook_id=hook,
                        outcome=cls,
                        number=n,
                        started_at=NOW - timedelta(minutes=minutes_ago),
                        duration_ms=5,
                        status_code=codes[cls],
                        error=error,
                    )
                )
    try:
        got = app.service.operations_status().model_dump(mode="json")
        assert got["dispatchers"] == []
        assert got["open_deliveries"] == {"pending": 5, "retrying": 1}
        assert got["oldest_due_age_seconds"] == 3000.0  # the expired lease's, 50 minutes
        assert got["attempts"] == {"2xx": 3, "3xx": 0, "4xx": 1, "5xx": 2, "timeout": 1, "connection": 3}
        assert got["success_rate"] == 0.3
        since = streak.isoformat().replace("+00:00", "Z")
        assert got["top_failing"] == [
            {"webhook_id": b.id, "team_id": kit.team.id, "failed_attempts": 4, "failing_since": None},
            {"webhook_id": a.id, "team_id": kit.team.id, "failed_attempts": 2, "failing_since": since},
            {"webhook_id": c.id, "team_id": kit.team.id, "failed_attempts": 1, "failing_since": since},
        ]
        assert got["switched_off"] == 1
        assert app.service.operations_status(top=1).top_failing[0].webhook_id == b.id
    finally:
        app.close()


def test_status_prints_a_table_json_and_watches_until_interrupted(fresh_url: str, tmp_path: Path):
    env = child_env(fresh_url)
    cmd = [sys.executable, "-m", "justscan_mcp", "status"]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert "Live dispatchers: 0" in plain.stdout and "none: nothing is being delivered" in plain.stdout
    assert "Open deliveries: pending 0, retrying 0" in plain.stdout
    doc = json.loads(subprocess.run([*cmd, "--json"], env=env, capture_output=True, timeout=60).stdout)
    assert doc["open_deliveries"] == {"pending": 0, "retrying": 0} and doc["success_rate"] is None
    # --watch: one JSON document per refresh while piped, until SIGINT (exit 0).
    out = tmp_path / "watch.out"
    with out.open("w") as sink:
        proc = subprocess.Popen([*cmd, "--watch", "--json", "--interval", "0.2"], env=env, stdout=sink)
    try:
        wait_for(lambda: out.read_text().count("\n") >= 3, what="three refreshes")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        stop_process(proc)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({d["generated_at"] for d in docs}) == len(docs) >= 3


# --- /metrics from a serve and a worker during real traffic -----------------------------------


def scrape(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of a /metrics answer, parsed with prometheus_client's own parser."""
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in samples.get(name, {}).items()}


def one(samples: dict, name: str) -> float:
    return samples[name][()]


def test_mcp_tool_calls_over_http_are_timed_per_tool_and_unknown_names_add_no_series(app: App, http_server):
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    kit = make_team(app, "timed")
    count = "justscan_mcp_tool_call_seconds_count"
    before = by_label(scrape(http_server.base), count, "tool")

    async def calls() -> None:
        hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kit.rw.key}"}, timeout=30)
        async with Client(streamable_http_client(f"{http_server.base}/mcp", http_client=hc)) as c:
            for _ in range(3):
                assert not (await c.call_tool("list_webhooks", {})).is_error
            assert (await c.call_tool("no_such_tool_" + "x" * 40, {})).is_error

    anyio.run(calls)
    after = scrape(http_server.base)
    counted = by_label(after, count, "tool")
    assert counted["list_webhooks"] - before.get("list_webhooks", 0) == 3
    assert counted["unknown"] - before.get("unknown", 0) == 1
    assert not [k for k in counted if k.startswith("no_such_tool")]
    assert {dict(k)["le"] for k in after["justscan_mcp_tool_call_seconds_bucket"]} >= {"0.001", "0.002"}


@pytest.mark.slow
def test_metrics_of_a_server_and_a_worker_match_the_delivery_log(fresh_url: str, tmp_path: Path):
    fast = {
        "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "1",
        "JUSTSCAN_RETRY_SCHEDULE": "0.1,0.1,0.1",
        "JUSTSCAN_DELIVERY_TIMEOUT": "2",
        "JUSTSCAN_LOG_FORMAT": "json",
        "JUSTSCAN_POLL_INTERVAL": "0.2",
    }
    app = _app(fresh_url, allow_private_targets=True)
    kit = make_team(app, "metrics-team-name")
    p = kit.principal()
    closed = free_port()  # nothing listens: connection refused
    with Receiver() as rx:
        rx.expect("/flaky", *[Reply(503, headers={"Retry-After": "1"})] * 3)
        urls = {
            "ok": rx.url("/ok"),
            "flaky": rx.url("/flaky"),  # 503 three times, then 200
            "bad": rx.url("/bad"),
            "gone": rx.url("/gone"),
            "closed": f"http://127.0.0.1:{closed}/x",
        }
        for path, reply in (("/bad", Reply(500)), ("/gone", Reply(410))):
            rx.expect(path, *[reply] * 200)
        hooks = {
            name: app.service.create_webhook(principal=p, url=url, events=["scan"]).id
            for name, url in urls.items()
        }
        port = free_port()
        worker = spawn_worker(
            child_env(fresh_url, **fast, JUSTSCAN_METRICS_PORT=str(port)), tmp_path / "w.log"
        )
        wbase = f"http://127.0.0.1:{port}"
        try:
            with spawn_server(child_env(fresh_url, **fast), tmp_path / "s.log") as server:
                wait_for(
                    lambda: httpx.get(f"{wbase}/readyz", timeout=1).status_code == 200, what="worker ready"
                )
                assert httpx.get(f"{wbase}/healthz", timeout=5).json()["status"] == "ok"
                emitter = kit.key(scopes=["events:write"])
                headers = {"Authorization": f"Bearer {emitter.key}"}
                seen = []
                for i in range(40):
                    r = httpx.post(
                        f"{server.base}/api/v1/events",
                        json={"event": "scan", "data": {"qr_code_id": 1, "scan_id": i + 1}},
                        headers=headers,
                    )
                    assert r.status_code == 202, r.text
                    if i % 10 == 0:  # scraped during the traffic: parses, counters only grow
                        seen.append(
                            sum(by_label(scrape(server.base), "justscan_attempts_total", "outcome").values())
                        )
                assert seen == sorted(seen)
                wait_for(
                    lambda: app.service.operations_status().open_deliveries == {"pending": 0, "retrying": 0},
                    timeout=60,
                    what="every delivery final",
                )
                wait_for(
                    lambda: len(app.service.operations_status().dispatchers) == 2,
                    what="both dispatchers beating",
                )
                # The database gauges are cached for a few seconds: wait for a snapshot taken
                # after the drain (the counters are live).
                for base in (server.base, wbase):
                    wait_for(
                        lambda base=base: (
                            by_label(scrape(base), "justscan_deliveries_open", "state")
                            == {"pending": 0, "retrying": 0}
                        ),
                        timeout=15,
                        what="a fresh database snapshot",
                    )
                s_metrics, w_metrics = scrape(server.base), scrape(wbase)
                s_text = httpx.get(f"{server.base}/metrics").text
        finally:
            stop_process(worker)
    with app.store.session() as s:
        rows = s.exec(  # type: ignore[call-overload]
            text("SELECT status_code, error, webhook_id FROM delivery_attempts")
        ).all()
    stored = Counter(outcome_class(code, error) for code, error, _ in rows)
    counted = Counter(by_label(s_metrics, "justscan_attempts_total", "outcome")) + Counter(
        by_label(w_metrics, "justscan_attempts_total", "outcome")
    )
    print("stored", dict(stored), "counted", dict(counted))
    assert {k: v for k, v in counted.items() if v} == dict(stored)
    assert stored["2xx"] == 80 and stored["5xx"] == 3 + 40 * 4 and stored["4xx"] == 40
    assert stored["connection"] == 40 * 4
    total = sum(stored.values())
    assert (
        one(s_metrics, "justscan_attempt_duration_seconds_count")
        + one(w_metrics, "justscan_attempt_duration_seconds_count")
        == total
    )
    assert (
        one(s_metrics, "justscan_event_to_first_attempt_seconds_count")
        + one(w_metrics, "justscan_event_to_first_attempt_seconds_count")
        == 5 * 40
    )
    assert (
        one(s_metrics, "justscan_retry_after_honoured_total")
        + one(w_metrics, "justscan_retry_after_honoured_total")
        == 3
    )
    saved = one(s_metrics, "justscan_save_batch_size_sum") + one(w_metrics, "justscan_save_batch_size_sum")
    assert saved == total
    # The gauges read from the database agree from either process.
    for m in (s_metrics, w_metrics):
        assert by_label(m, "justscan_deliveries_open", "state") == {"pending": 0, "retrying": 0}
        assert one(m, "justscan_live_dispatchers") == 2 and one(m, "justscan_database_up") == 1
        assert one(m, "justscan_oldest_due_delivery_age_seconds") == 0
        assert by_label(m, "justscan_recent_attempts", "outcome")["5xx"] == stored["5xx"]
        failing = by_label(m, "justscan_webhook_recent_failed_attempts", "webhook_id")
        assert failing[str(hooks["bad"])] == 160 and str(hooks["ok"]) not in failing
    # Nothing that names a team, a URL or a secret.
    assert "metrics-team-name" not in s_text and "127.0.0.1" not in s_text and kit.rw.key not in s_text
    # The JSON attempt lines of both processes say the same as the counters.
    lines = [
        json.loads(line)
        for log in (tmp_path / "s.log", tmp_path / "w.log")
        for line in log.read_text().splitlines()
        if line.startswith("{")
    ]
    logged = Counter(x["outcome"] for x in lines if x.get("msg") == "attempt")
    assert logged == stored
    app.close()


# --- the takeover of a dead worker's deliveries, and a database outage, in the logs -----------


def test_a_claim_says_which_deliveries_it_took_over_from_an_expired_lease(app: App):
    kit = make_team(app, "takeover")
    hook = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/t", events=["scan"]
    )
    (did,) = app.service.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 1, "scan_id": 1}
    ).deliveries
    first = app.store.claim_due(claim="first", now=utcnow(), lease_seconds=0.2, limit=10, only=[hook.id])
    assert [c.delivery_id for c in first] == [did] and first.taken_over == []
    second = wait_for(
        lambda: app.store.claim_due(claim="second", now=utcnow(), lease_seconds=30, limit=10, only=[hook.id]),
        what="the first lease to expire",
    )
    assert [c.delivery_id for c in second] == [did] and second.taken_over == [did]

    def result(claim: str) -> AttemptResult:
        return AttemptResult(
            delivery_id=did,
            claim=claim,
            number=1,
            started_at=utcnow(),
            duration_ms=3,
            status_code=200,
            response_body="ok",
            error=None,
            state="succeeded",
            next_attempt_at=None,
            webhook_id=hook.id,
        )

    # The dead claim's result is refused; the taken-over claim's is saved under its marked token.
    assert app.store.complete(worker="w", results=[result(first[0].claim)], now=utcnow()) == []
    assert app.store.complete(worker="w", results=[result(second[0].claim)], now=utcnow()) == [did]


@pytest.mark.slow
def test_a_sigkilled_worker_s_delivery_is_taken_over_logged_and_counted(own_pg: str, tmp_path: Path):
    pg_url = own_pg  # another module's expired leases on the shared database would be taken over too
    app = _app(pg_url, allow_private_targets=True)
    kit = make_team(app, "sigkill")
    env = {
        "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "1",
        "JUSTSCAN_DELIVERY_TIMEOUT": "3",
        "JUSTSCAN_LEASE_MARGIN": "1",
    }
    with Receiver() as rx:
        rx.expect("/t", Reply(200, delay=20))  # the first send hangs; the next one is answered
        hook = app.service.create_webhook(principal=kit.principal(), url=rx.url("/t"), events=["scan"])
        first = spawn_worker(child_env(pg_url, **env), tmp_path / "first.log")
        try:
            wait_for(lambda: "started" in (tmp_path / "first.log").read_text(), what="first worker up")
            (did,) = app.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 1, "scan_id": 1}
            ).deliveries
            wait_for(lambda: rx.at("/t"), what="the first send in flight")
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            stop_process(first)
        port = free_port()
        log = tmp_path / "second.log"
        second = spawn_worker(child_env(pg_url, **env, JUSTSCAN_METRICS_PORT=str(port)), log)
        try:
            wait_for(lambda: len(rx.at("/t")) == 2, timeout=30, what="the delivery sent again")
            wait_for(
                lambda: app.store.get_delivery(team_id=kit.team.id, delivery_id=did)[0].state == "succeeded",
                what="the delivery saved",
            )
            text_ = log.read_text()
            assert "took over 1 deliveries whose lease had expired" in text_ and f": {did}" in text_
            metrics = scrape(f"http://127.0.0.1:{port}")
            assert one(metrics, "justscan_deliveries_taken_over_total") == 1
        finally:
            stop_process(second)
    assert hook.id
    app.close()


@pytest.mark.slow
@pytest.mark.serial
def test_a_database_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    pg_base_url: str | None, tmp_path: Path
):
    """On a database of its own: on the shared one, another test's retry could fall due as the
    database stops, and the outage was then first seen (and logged) by a save, not a claim."""
    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test stops PostgreSQL; set it")
    with own_pg_database(pg_base_url, "justscan_outage") as url:
        _outage_is_logged_once(url, tmp_path)


def _outage_is_logged_once(pg_url: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "worker.log"
    worker = spawn_worker(
        child_env(pg_url, JUSTSCAN_POLL_INTERVAL="0.2", JUSTSCAN_METRICS_PORT=str(port)), log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, what="worker ready")
        postgres("stop")
        try:
            wait_for(
                lambda: "database unavailable (claim failed" in log.read_text(), what="the outage logged"
            )
            down = httpx.get(f"{base}/readyz", timeout=10)
            assert down.status_code == 503 and down.json()["reason"] == "the database does not answer"
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 503
            assert one(scrape(base), "justscan_database_up") == 0
        finally:
            postgres("start")
        wait_for(lambda: "database reachable again after" in log.read_text(), timeout=30, what="the recovery")
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, what="ready again")
        lines = log.read_text().splitlines()
        assert sum("database unavailable" in line for line in lines) == 1
        assert sum("reachable again" in line for line in lines) == 1
        errors = by_label(scrape(base), "justscan_database_errors_total", "kind")
        assert errors.get("unavailable", 0) >= 1
    finally:
        stop_process(worker)


# --- progress -----------------------------------------------------------------------------------


def test_progress_is_plain_lines_off_a_terminal_at_most_one_per_interval():
    out = io.StringIO()
    now = [0.0]
    with Progress("recording events", 30, unit="events", stream=out, every=5, clock=lambda: now[0]) as p:
        for _ in range(30):
            now[0] += 0.25  # 7.5 seconds in all (a step exact in binary)
            p.update()
    lines = out.getvalue().splitlines()
    assert lines == [
        "recording events: 20/30 (67 %) events, 4/s, 5 s",
        "recording events: 30/30 events, 4/s, done in 7.5 s",
    ]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    out = io.StringIO()
    with Progress("applying migrations", 3, unit="revisions", stream=out, bar=True) as p:
        p.write("a message")
        for _ in range(3):
            p.update()
    shown = out.getvalue()
    assert "\r" in shown and "3/3" in shown and "100%" in shown and "a message" in shown


def test_db_upgrade_shows_progress_on_stderr_and_keeps_stdout_for_the_result(tmp_path: Path):
    env = child_env(f"sqlite:///{tmp_path / 'p.db'}")
    run = subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "db", "upgrade", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["from"] is None
    assert "applying migrations: " in run.stderr and "revisions" in run.stderr and "done in" in run.stderr


def test_a_bad_metrics_port_is_refused_with_its_name(tmp_path: Path):
    env = child_env(f"sqlite:///{tmp_path / 'x.db'}", JUSTSCAN_METRICS_PORT="http")
    run = subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "worker"], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0 and "JUSTSCAN_METRICS_PORT" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "worker", "--metrics-port", "70000"],
        env={**env, "JUSTSCAN_METRICS_PORT": ""},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "--metrics-port" in run.stderr


# --- the docs, the alert rules and the dashboard name real series ------------------------------

DOCS = Path(__file__).parents[1] / "docs"


def _base(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_series_is_documented_and_the_rules_and_dashboard_use_only_real_ones(tmp_path: Path):
    import re

    import yaml

    app = _app(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        # Family names (a counter's series end in _total): a labelled family with no sample
        # yet, such as the database errors, is still declared.
        exposed = {
            f.name + ("_total" if f.type == "counter" else "")
            for f in text_string_to_metric_families(app.metrics.render().decode())
        }
    finally:
        app.close()
    ours = {n for n in exposed if n.startswith("justscan_")}
    assert len(ours) == 20, sorted(ours)
    page = (DOCS / "observability.md").read_text()
    undocumented = sorted(n for n in ours if f"`{n}`" not in page)
    assert not undocumented, f"series missing from docs/observability.md: {undocumented}"

    rules = yaml.safe_load((DOCS / "monitoring" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert len(alerts) == 3 and all(
        {"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in alerts
    )
    dashboard = json.loads((DOCS / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [r["expr"] for r in alerts] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {_base(n) for e in exprs for n in re.findall(r"\b(justscan_\w+|process_\w+)", e)}
    assert named and not named - exposed, f"unknown series: {sorted(named - exposed)}"
    for alert in alerts:
        assert f"#{alert['annotations']['runbook'].split('#')[1]}" in {
            "#" + h.lower().replace(" ", "-") for h in re.findall(r"^### (.+)$", page, re.M)
        }
