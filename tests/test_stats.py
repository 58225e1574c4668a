"""get_webhook_stats against hand-counted fixtures on both databases, through the service, REST and
an MCP client; the bad inputs; the dashboard's chart and the admin area's success rates."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from justscan_mcp.app import App
from justscan_mcp.errors import InvalidInput, NotFound
from justscan_mcp.models import Delivery, DeliveryAttempt, Event, Webhook, outcome_class
from tests.conftest import TeamKit, make_team

# A fixed clock: 15:30 UTC, so `hours=3` covers 13:00 to now and the fixtures sit at known hours.
NOW = datetime(2026, 11, 29, 15, 30, tzinfo=UTC)


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return NOW.replace(hour=hh, minute=mm, second=ss)


# (created at, state, is_test, attempts as (status, error, duration ms))
FIXTURE = [
    (at(12, 58), "failed", False, [(500, "receiver answered HTTP 500", 7)]),  # before the window
    (at(13, 5), "succeeded", False, [(200, None, 40)]),
    (
        at(13, 10),
        "failed",
        False,
        [
            (500, "receiver answered HTTP 500", 100),
            (None, "timed out after 10s", 10000),
            (None, "connection failed: Connection refused", 5),
            (404, "receiver answered HTTP 404", 20),
        ],
    ),
    (at(14, 0), "succeeded", False, [(503, "receiver answered HTTP 503", 30), (204, None, 60)]),
    (at(14, 30), "pending", False, []),
    (at(15, 20), "retrying", False, [(302, "redirect to 'x' not followed", 15)]),
    (at(15, 25), "succeeded", True, [(200, None, 10)]),  # a test delivery counts too
]
# Counted by hand from FIXTURE, window 13:00-15:30 (attempts start 1, 2, 3... s after their delivery).
EXPECTED = {
    "hours": 3,
    "since": "2026-11-29T13:00:00Z",
    "deliveries": {"pending": 1, "retrying": 1, "succeeded": 3, "failed": 1},
    "attempts": {"2xx": 3, "3xx": 1, "4xx": 1, "5xx": 2, "timeout": 1, "connection": 1},
    "success_rate": 0.75,
    # durations sorted: 5 10 15 20 30 40 60 100 10000; nearest rank 5 of 9 and 9 of 9
    "latency_ms": {"p50": 30, "p95": 10000},
    # latency_ms per hour is the mean: (40+100+10000+5+20)/5, (30+60)/2, (15+10)/2 rounded half-even
    "hourly": [
        {"hour": "2026-11-29T13:00:00Z", "succeeded": 1, "failed": 1, "latency_ms": 2033},
        {"hour": "2026-11-29T14:00:00Z", "succeeded": 1, "failed": 0, "latency_ms": 45},
        {"hour": "2026-11-29T15:00:00Z", "succeeded": 1, "failed": 0, "latency_ms": 12},
    ],
}


def load(app: App, kit: TeamKit, webhook_id: int, rows=FIXTURE) -> None:
    with app.store.session(write=True) as s:
        event = Event(team_id=kit.team.id, name="scan", payload="{}", created_at=at(12, 0))
        s.add(event)
        s.flush()
        for created, state, is_test, attempts in rows:
            d = Delivery(
                team_id=kit.team.id,
                webhook_id=webhook_id,
                event_id=event.id,
                event="test" if is_test else "scan",
                state=state,
                is_test=is_test,
                attempt_count=len(attempts),
                next_attempt_at=created if state in ("pending", "retrying") else None,
                created_at=created,
                updated_at=created,
            )
            s.add(d)
            s.flush()
            for n, (status, error, ms) in enumerate(attempts, 1):
                s.add(
                    DeliveryAttempt(
                        delivery_id=d.id,
                        webhook_id=webhook_id,
                        outcome=outcome_class(status, error),
                        number=n,
                        started_at=created + timedelta(seconds=n),
                        duration_ms=ms,
                        status_code=status,
                        error=error,
                    )
                )


@pytest.fixture
def fixed(app: App, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(app.service, "clock", lambda: NOW)
    kit = make_team(app, "stats")
    hook = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/s", events=["scan"]
    )
    other = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/o", events=["scan"]
    )
    load(app, kit, hook.id)
    load(app, kit, other.id, [(at(13, 30), "succeeded", False, [(200, None, 1)])])  # must not count
    streak = NOW - timedelta(minutes=50)
    with app.store.session(write=True) as s:
        row = s.get(Webhook, hook.id)
        assert row is not None
        row.failing_since = streak
        s.add(row)
    return kit, hook.id, streak


def test_stats_match_the_hand_counted_fixture(app: App, fixed):
    kit, hook_id, streak = fixed
    got = app.service.get_webhook_stats(principal=kit.principal(), webhook_id=hook_id, hours=3)
    body = got.model_dump(mode="json")
    assert body.pop("webhook_id") == hook_id
    assert body.pop("failing_since") == streak.isoformat().replace("+00:00", "Z")
    assert body == EXPECTED


def test_the_default_is_24_hours_one_bucket_each_and_an_empty_webhook_has_nulls(app: App, fixed):
    kit, hook_id, _ = fixed
    day = app.service.get_webhook_stats(principal=kit.principal(), webhook_id=hook_id)
    assert day.hours == 24 and len(day.hourly) == 24
    assert day.hourly[0].hour == NOW.replace(minute=0) - timedelta(hours=23)
    assert day.deliveries["failed"] == 2  # the 12:58 one is inside a day
    assert sum(h.failed for h in day.hourly) == day.deliveries["failed"]
    empty = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/e", events=["scan"]
    )
    none = app.service.get_webhook_stats(principal=kit.principal(), webhook_id=empty.id, hours=1)
    assert none.success_rate is None and none.latency_ms.p50 is None and none.latency_ms.p95 is None
    assert set(none.deliveries.values()) == {0} and set(none.attempts.values()) == {0}


@pytest.mark.parametrize("hours", [0, 721, -1, "24", 2.5, True])
def test_bad_hours_are_refused_naming_the_field(kit: TeamKit, hours):
    hook = kit.app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/h", events=["scan"]
    )
    with pytest.raises(InvalidInput) as err:
        kit.app.service.get_webhook_stats(principal=kit.principal(), webhook_id=hook.id, hours=hours)
    assert err.value.field == "hours"


def test_another_teams_webhook_is_not_found(kit: TeamKit, other: TeamKit):
    theirs = other.app.service.create_webhook(
        principal=other.principal(), url="https://hooks.example.test/t", events=["scan"]
    )
    with pytest.raises(NotFound):
        kit.app.service.get_webhook_stats(principal=kit.principal(), webhook_id=theirs.id)


def test_rest_and_mcp_answer_the_same_stats(app: App, http_server, fixed):
    """The figures through the real HTTP server: REST `GET /stats` and the MCP tool over
    streamable HTTP, with the server's real clock (so only what does not depend on the hour)."""
    import anyio
    import httpx

    from tests.test_http import http_client

    kit, hook_id, _ = fixed
    headers = {"Authorization": f"Bearer {kit.rw.key}"}
    r = httpx.get(f"{http_server.base}/api/v1/webhooks/{hook_id}/stats?hours=720", headers=headers)
    assert r.status_code == 200, r.text
    rest = r.json()
    assert len(rest["hourly"]) == 720 and rest["deliveries"] == {
        "pending": 1,
        "retrying": 1,
        "succeeded": 3,
        "failed": 2,
    }
    bad = httpx.get(f"{http_server.base}/api/v1/webhooks/{hook_id}/stats?hours=0", headers=headers)
    assert bad.status_code == 422 and bad.json()["field"] == "hours"

    async def call() -> dict:
        async with http_client(http_server, kit.key(scopes=["webhooks:read"]).key) as c:
            result = await c.call_tool("get_webhook_stats", {"webhook_id": hook_id, "hours": 720})
            assert not result.is_error, result.content
            return result.structured_content or {}

    via_mcp = anyio.run(call)
    assert {k: via_mcp[k] for k in ("deliveries", "attempts", "latency_ms", "success_rate")} == {
        k: rest[k] for k in ("deliveries", "attempts", "latency_ms", "success_rate")
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00Z", via_mcp["hourly"][-1]["hour"])


@pytest.mark.anyio
async def test_outcome_classes_of_real_attempts(db_url: str):
    """The classes from what the real sender records: a 2xx, a 5xx, a 4xx, a receiver that never
    answers (timeout) and a port nobody listens on (connection)."""
    from tests.conftest import free_port
    from tests.receiver import BlackHole, Receiver, Reply
    from tests.test_delivery import until
    from tests.test_faults import running

    with Receiver() as receiver, BlackHole() as hole:
        async with running(db_url, delivery_timeout=0.5) as app:
            kit = make_team(app, "stats-real")
            urls = {
                "2xx": receiver.url("/ok"),
                "5xx": receiver.url("/busy"),
                "4xx": receiver.url("/nope"),
                "timeout": hole.url("/void"),
                "connection": f"http://127.0.0.1:{free_port()}/closed",
            }
            receiver.expect("/busy", Reply(503))
            receiver.expect("/nope", Reply(404))
            hooks = {}
            for outcome, url in urls.items():
                hooks[outcome] = app.service.create_webhook(
                    principal=kit.principal(), url=url, events=["scan"]
                )
                app.service.send_test(principal=kit.principal(), webhook_id=hooks[outcome].id)

            def stats(outcome: str):
                return app.service.get_webhook_stats(principal=kit.principal(), webhook_id=hooks[outcome].id)

            for outcome in urls:
                await until(
                    lambda o=outcome: stats(o).deliveries["pending"] == 0, what=f"the {outcome} attempt"
                )
                got = stats(outcome)
                assert got.attempts == {c: int(c == outcome) for c in got.attempts}, (outcome, got.attempts)
                assert got.success_rate == (1.0 if outcome == "2xx" else 0.0)


def test_admin_overview_has_each_teams_success_rate(app: App, fixed):
    kit, _, _ = fixed
    quiet = make_team(app, "stats-quiet")
    app.service.create_webhook(
        principal=quiet.principal(), url="https://hooks.example.test/q", events=["scan"]
    )
    rates = app.service.admin_overview(limit=1000).success_rates
    # Within 24 h of 15:30: 3 + 1 (the other webhook) succeeded, 2 failed (the 12:58 one too).
    assert rates[kit.team.id] == round(4 / 6, 4)
    assert rates[quiet.team.id] is None


def test_the_chart_draws_one_bar_pair_per_hour_on_one_scale(app: App, fixed):
    from justscan_mcp.dashboard import chart_of

    kit, hook_id, _ = fixed
    chart = chart_of(app.service.get_webhook_stats(principal=kit.principal(), webhook_id=hook_id))
    assert len(chart.hours) == 24 and chart.most == 2 and chart.slowest == 2033
    by_label = {h.label: h for h in chart.hours}
    full = chart.base - chart.top
    assert by_label["13:00"].ok_height + by_label["13:00"].bad_height == pytest.approx(full, abs=0.2)
    assert by_label["14:00"].ok_height == pytest.approx(full / 2, abs=0.2)
    assert by_label["14:00"].bad_height == 0
    assert len(chart.line.split()) == 4  # hours with attempts: 12, 13, 14 and 15
