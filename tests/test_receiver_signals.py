"""What a receiver says changes the schedule: `Retry-After` on 429/503 (seconds or an HTTP-date,
capped one hour past the step) and `410 Gone` (no more attempts). Pure rules first, then a real
receiver on 127.0.0.1 against a real dispatcher, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from justscan_mcp.retry import GONE_NOTE, RETRY_AFTER_CAP, after_attempt, parse_retry_after
from tests.conftest import make_team
from tests.receiver import Receiver, Reply
from tests.test_delivery import until
from tests.test_faults import delivery, emit, final, hook, running

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SCHEDULE = (60.0, 300.0, 1800.0)


def step(**kwargs):
    return after_attempt(attempt_number=1, succeeded=False, schedule=SCHEDULE, now=NOW, **kwargs)


def test_retry_after_in_seconds_and_as_a_date():
    assert parse_retry_after("120", now=NOW) == 120.0
    assert parse_retry_after(format_datetime(NOW + timedelta(seconds=90), usegmt=True), now=NOW) == 90.0
    assert parse_retry_after(format_datetime(NOW - timedelta(hours=1), usegmt=True), now=NOW) == 0.0
    for garbage in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(garbage, now=NOW) is None, garbage


def test_retry_after_waits_for_the_later_of_step_and_header_capped_an_hour_past_the_step():
    longer = step(status_code=429, retry_after="600")
    assert (longer.state, longer.next_attempt_at, longer.retry_after) == (
        "retrying",
        NOW + timedelta(seconds=600),
        600,
    )
    shorter = step(status_code=503, retry_after="5")
    assert shorter.next_attempt_at == NOW + timedelta(seconds=60)  # the step is later
    capped = step(status_code=429, retry_after="999999")
    assert capped.next_attempt_at == NOW + timedelta(seconds=60 + RETRY_AFTER_CAP)
    dated = step(status_code=503, retry_after=format_datetime(NOW + timedelta(minutes=20), usegmt=True))
    assert dated.next_attempt_at == NOW + timedelta(minutes=20)
    # Only 429 and 503 carry it; elsewhere the schedule is as before.
    assert step(status_code=500, retry_after="600").next_attempt_at == NOW + timedelta(seconds=60)
    assert step(status_code=429).next_attempt_at == NOW + timedelta(seconds=60)
    # The last attempt still ends the delivery.
    last = after_attempt(
        attempt_number=4, succeeded=False, schedule=SCHEDULE, now=NOW, status_code=429, retry_after="10"
    )
    assert (last.state, last.next_attempt_at) == ("failed", None)


def test_410_ends_the_delivery_at_once_and_says_why():
    gone = step(status_code=410)
    assert (gone.state, gone.next_attempt_at, gone.note) == ("failed", None, GONE_NOTE)


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.mark.anyio
async def test_a_receivers_retry_after_delays_the_next_attempt(db_url: str, receiver: Receiver):
    async with running(db_url) as app:  # schedule compressed to 0.2 / 0.4 / 0.6 s
        kit = make_team(app, "retry-after")
        hook(kit, receiver.url("/busy"), "/busy", receiver)
        # Five seconds from now: the second attempt comes about 2 s in, so about 3 s remain (an
        # HTTP-date drops the fraction of a second).
        date = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
        receiver.expect(
            "/busy",
            Reply(429, headers={"Retry-After": "2"}),
            Reply(503, headers={"Retry-After": date}),
            Reply(204, body=b""),
        )
        (did,) = emit(app, kit)
        d, attempts = await until(lambda: final(app, kit, did), timeout=30, what="three attempts")
        assert d.state == "succeeded"
        arrivals = [r.at for r in receiver.at("/busy")]
        assert len(arrivals) == 3
        assert arrivals[1] - arrivals[0] >= 2.0, arrivals
        assert arrivals[2] - arrivals[1] >= 1.5, arrivals
        first, second, _ = attempts
        assert first.retry_after_seconds == 2 and 2 <= second.retry_after_seconds <= 4
        assert first.next_retry_at is not None
        waited = (first.next_retry_at - first.started_at).total_seconds()
        assert 2.0 <= waited < 2.0 + 5, waited
        logged = app.service.list_deliveries(principal=kit.principal(), webhook_id=d.webhook_id)
        assert logged.deliveries[0].attempts[0].retry_after_seconds == 2


@pytest.mark.anyio
async def test_retry_after_is_capped_an_hour_past_the_step(db_url: str, receiver: Receiver):
    async with running(db_url) as app:
        kit = make_team(app, "retry-cap")
        hook(kit, receiver.url("/slowdown"), "/slowdown", receiver)
        receiver.expect("/slowdown", Reply(429, headers={"Retry-After": "86400"}))
        (did,) = emit(app, kit)
        d, attempts = await until(
            lambda: (found := delivery(app, kit, did)) and found[1] and found, what="the first attempt"
        )
        assert d.state == "retrying"
        (first,) = attempts
        waited = (first.next_retry_at - first.started_at).total_seconds()
        assert 0.2 + RETRY_AFTER_CAP <= waited < 0.2 + RETRY_AFTER_CAP + 5, waited
        assert first.retry_after_seconds == 86400


@pytest.mark.anyio
async def test_410_gone_is_not_retried(db_url: str, receiver: Receiver):
    async with running(db_url) as app:
        kit = make_team(app, "gone")
        hook(kit, receiver.url("/gone"), "/gone", receiver)
        receiver.expect("/gone", Reply(410), Reply(204), Reply(204))
        (did,) = emit(app, kit)
        d, attempts = await until(lambda: final(app, kit, did), what="the delivery to end")
        assert (d.state, d.note, d.attempt_count) == ("failed", GONE_NOTE, 1)
        assert [(a.status_code, a.next_retry_at) for a in attempts] == [(410, None)]
        assert len(receiver.at("/gone")) == 1
