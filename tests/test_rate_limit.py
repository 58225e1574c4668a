"""A webhook's `rate_limit`: the pure bucket, the claim's gate on both databases, a real receiver
against the in-process dispatcher, and two worker processes sharing one limit."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlmodel import col

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.errors import InvalidInput
from justscan_mcp.models import Delivery, DeliveryAttempt
from justscan_mcp.ratelimit import take
from tests.conftest import TeamKit, make_team, wait_for
from tests.receiver import Receiver, Reply
from tests.test_delivery import until
from tests.test_faults import emit, running
from tests.test_workers import start_worker, stop

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# --- the bucket, as a pure function -------------------------------------------------------------


def test_a_full_bucket_gives_one_seconds_worth_then_one_token_per_step():
    first = take(rate=5, tat=None, now=NOW, wanted=30)
    assert first.granted == 5 and first.tat == later(1.0)
    assert first.open_at == later(0.2)  # one token is back after 1/5 s
    assert take(rate=5, tat=first.tat, now=later(0.1), wanted=25).granted == 0
    second = take(rate=5, tat=first.tat, now=later(0.2), wanted=25)
    assert (second.granted, second.open_at) == (1, later(0.4))
    # A quiet webhook's bucket fills up again, but never past one second's worth.
    assert take(rate=5, tat=later(1.0), now=later(60), wanted=30).granted == 5


def test_the_gate_stays_open_while_tokens_are_left_and_opens_in_tenths_at_high_rates():
    some = take(rate=100, tat=None, now=NOW, wanted=10)
    assert some.granted == 10 and some.open_at is None  # 90 tokens left: claims go on at once
    drained = take(rate=1000, tat=None, now=NOW, wanted=5000)
    assert drained.granted == 1000
    # Not a claim per token: the gate opens when a tenth of a second's worth is back.
    assert drained.open_at == later(0.1)
    assert take(rate=1000, tat=drained.tat, now=later(0.1), wanted=4000).granted == 100


def test_over_a_long_run_the_bucket_never_gives_more_than_the_rate_plus_one_burst():
    for rate in (1, 5, 37, 1000):
        tat, given, now = None, 0, NOW
        for _ in range(3000):  # a claim every 7 ms for 21 s, each wanting more than there is
            grant = take(rate=rate, tat=tat, now=now, wanted=rate * 2)
            tat, given = grant.tat, given + grant.granted
            now += timedelta(milliseconds=7)
        elapsed = (now - NOW).total_seconds()
        assert rate * elapsed <= given <= rate * elapsed + rate, (rate, given)


# --- input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 1001, -5, "5", True, 2.5])
def test_a_bad_rate_limit_is_refused_naming_the_field_and_nothing_is_stored(kit: TeamKit, bad):
    url = "https://hooks.example.test/rate"
    with pytest.raises(InvalidInput) as err:
        kit.app.service.create_webhook(principal=kit.principal(), url=url, events=["scan"], rate_limit=bad)
    assert err.value.field == "rate_limit"
    assert kit.webhook_count() == 0
    made = kit.app.service.create_webhook(principal=kit.principal(), url=url, events=["scan"], rate_limit=7)
    with pytest.raises(InvalidInput) as err:
        kit.app.service.update_webhook(
            principal=kit.principal(), webhook_id=made.id, changes={"rate_limit": bad}
        )
    assert err.value.field == "rate_limit"
    assert kit.app.service.get_webhook(principal=kit.principal(), webhook_id=made.id).rate_limit == 7


def test_rate_limit_is_set_shown_changed_and_removed(kit: TeamKit):
    svc, who = kit.app.service, kit.principal()
    made = svc.create_webhook(
        principal=who, url="https://hooks.example.test/r", events=["scan"], rate_limit=1
    )
    assert made.rate_limit == 1
    assert (
        svc.update_webhook(principal=who, webhook_id=made.id, changes={"rate_limit": 1000}).rate_limit == 1000
    )
    assert (
        svc.update_webhook(principal=who, webhook_id=made.id, changes={"rate_limit": None}).rate_limit is None
    )
    plain = svc.create_webhook(principal=who, url="https://hooks.example.test/p", events=["scan"])
    assert plain.rate_limit is None


# --- the claim's gate, on both databases ---------------------------------------------------------


def _limited(app: App, kit: TeamKit, rate: int | None, path: str):
    return app.service.create_webhook(
        principal=kit.principal(), url=f"https://hooks.example.test/{path}", events=["scan"], rate_limit=rate
    )


def _record(app: App, kit: TeamKit, n: int, *, at: datetime, event: str = "scan") -> list[int]:
    ids = []
    for i in range(n):
        _, made = app.store.record_event(
            team_id=kit.team.id, event=event, payload=f'{{"n": {i}}}'.encode(), now=at
        )
        ids += made
    return ids


def _leased(app: App, ids: list[int]) -> set[int]:
    with app.store.session() as s:
        rows = s.execute(select(Delivery.id, Delivery.lease_owner).where(col(Delivery.id).in_(ids))).all()
    return {i for i, owner in rows if owner is not None}


def test_the_claim_takes_only_what_the_bucket_gives_and_leaves_the_rest_unleased(app: App):
    kit = make_team(app, "rate-claim")
    limited = _limited(app, kit, 5, "five")
    queued = _record(app, kit, 30, at=later(-5))
    got = app.store.claim_due(claim="a", now=NOW, lease_seconds=60, limit=100)
    assert [c.delivery_id for c in got] == queued[:5]  # the oldest five
    assert got.gate_opens_at == later(0.2)
    assert _leased(app, queued) == set(queued[:5])  # the 25 held back hold no lease, no slot
    # The gate is shared: another claimer gets nothing from this webhook before it opens.
    assert list(app.store.claim_due(claim="b", now=later(0.1), lease_seconds=60, limit=100)) == []
    assert app.store.next_due_after(later(0.1)) == later(0.2)  # what a dispatcher's timer waits for
    opened = app.store.claim_due(claim="b", now=later(0.2), lease_seconds=60, limit=100)
    assert [c.delivery_id for c in opened] == [queued[5]]
    # Removing the limit opens the gate at once.
    app.service.update_webhook(principal=kit.principal(), webhook_id=limited.id, changes={"rate_limit": None})
    rest = app.store.claim_due(claim="c", now=later(0.21), lease_seconds=60, limit=100)
    assert sorted(c.delivery_id for c in rest) == queued[6:]
    assert rest.gate_opens_at is None


def test_held_deliveries_do_not_keep_other_webhooks_waiting(app: App):
    kit = make_team(app, "rate-others")
    slow = _limited(app, kit, 1, "one")
    free = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/free", events=["form_submit"]
    )
    held = _record(app, kit, 50, at=later(-10))  # older: the claim's walk meets them first
    others = _record(app, kit, 20, at=later(-5), event="form_submit")
    first = app.store.claim_due(claim="a", now=NOW, lease_seconds=60, limit=10)
    assert [c.webhook_id for c in first] == [slow.id]  # one token; the other nine went back
    second = app.store.claim_due(claim="b", now=NOW, lease_seconds=60, limit=100)
    assert sorted(c.delivery_id for c in second) == others
    assert {c.webhook_id for c in second} == {free.id}
    assert _leased(app, held) == {first[0].delivery_id}


# --- a real receiver -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.serial
async def test_30_deliveries_at_5_per_second_take_5_seconds_at_a_real_receiver(db_url: str):
    with Receiver() as receiver:
        async with running(db_url) as app:
            kit = make_team(app, "rate-real")
            limited = app.service.create_webhook(
                principal=kit.principal(), url=receiver.url("/five"), events=["scan"], rate_limit=5
            )
            free = app.service.create_webhook(
                principal=kit.principal(), url=receiver.url("/free"), events=["form_submit"]
            )
            receiver.secrets["/five"], receiver.secrets["/free"] = limited.secret, free.secret
            started = time.monotonic()
            for n in range(30):
                emit(app, kit, n + 1)
            # While the limited webhook's queue drains, another webhook's events go out at once.
            await until(lambda: len(receiver.at("/five")) >= 5, what="the first burst")
            for n in range(10):
                app.service.emit_event(
                    team_id=kit.team.id,
                    event="form_submit",
                    data={"landing_page_id": n + 1, "fields": {"n": n}},
                )
            await until(lambda: len(receiver.at("/free")) == 10, timeout=3, what="the unlimited webhook")
            assert len(receiver.at("/five")) < 25, (
                "the limited queue was already done: the test proves nothing"
            )
            await until(lambda: len(receiver.at("/five")) == 30, timeout=30, what="30 limited deliveries")
            times = [r.at for r in receiver.at("/five")]
    assert times[-1] - started >= 5.0, f"30 deliveries at 5/s took {times[-1] - started:.2f}s"
    assert _most_in_window(times, 1.0) <= 10  # one second's worth of burst plus one second's rate
    # Once the burst is spent, the rate: 10 in two seconds, +1 at the window's edge and +1 for the
    # jitter between a grant and its arrival.
    assert _most_in_window(times[10:], 2.0) <= 12


def _most_in_window(times: list[float], width: float) -> int:
    return max(sum(1 for t in times if start <= t < start + width) for start in times)


@pytest.mark.slow
@pytest.mark.serial
def test_two_worker_processes_share_one_limit(db_url: str, tmp_path):
    """Each worker may have one send in flight for the webhook and the receiver takes 0.25 s, so
    one worker alone could do 4 a second and the two together 8: the limit of 5 is what binds,
    and both workers must take from the one bucket."""
    app = App.build(Settings(database_url=db_url, allow_private_targets=True))
    app.prepare()
    with Receiver() as receiver:
        kit = make_team(app, "rate-workers")
        limited = app.service.create_webhook(
            principal=kit.principal(), url=receiver.url("/shared"), events=["scan"], rate_limit=5
        )
        receiver.secrets["/shared"] = limited.secret
        receiver.expect("/shared", *[Reply(200, delay=0.25)] * 30)
        workers = [
            start_worker(db_url, tmp_path / f"w{i}.log", JUSTSCAN_MAX_IN_FLIGHT_PER_WEBHOOK="1")
            for i in range(2)
        ]
        try:
            started = time.monotonic()
            for n in range(30):
                app.service.emit_event(
                    team_id=kit.team.id, event="scan", data={"qr_code_id": 9, "scan_id": n + 1}
                )
            wait_for(lambda: len(receiver.at("/shared")) == 30, timeout=60, what="30 deliveries")
            times = [r.at for r in receiver.at("/shared")]
            with app.store.session() as s:
                used = s.execute(
                    select(DeliveryAttempt.worker)
                    .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                    .where(Delivery.webhook_id == limited.id)
                    .distinct()
                ).all()
        finally:
            for w in workers:
                stop(w)
            app.close()
    assert len(used) == 2, "one worker did all the work: the bucket was not shared"
    assert times[-1] - started >= 5.0, f"took {times[-1] - started:.2f}s"
    assert _most_in_window(times[10:], 2.0) <= 12
