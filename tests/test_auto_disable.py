"""A webhook whose failure streak outlives JUSTSCAN_DISABLE_AFTER is switched off, keeping its
queue for recovery; `failing_since` shows a streak as it forms. Real receiver, real dispatcher,
both databases."""

from __future__ import annotations

import time

import anyio
import pytest

from justscan_mcp.config import Settings
from justscan_mcp.errors import ConfigError
from justscan_mcp.models import utcnow
from tests.conftest import make_team
from tests.receiver import Receiver, Reply
from tests.test_delivery import until
from tests.test_faults import delivery, emit, final, hook, running

pytestmark = pytest.mark.anyio


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def test_the_setting_is_seconds_and_zero_turns_it_off():
    assert Settings.from_env({}).disable_after == 5 * 24 * 3600
    assert Settings.from_env({"JUSTSCAN_DISABLE_AFTER": "0"}).disable_after == 0
    with pytest.raises(ConfigError, match="JUSTSCAN_DISABLE_AFTER"):
        Settings.from_env({"JUSTSCAN_DISABLE_AFTER": "-3"})


async def test_failing_since_shows_a_streak_forming_and_a_success_ends_it(db_url: str, receiver: Receiver):
    async with running(db_url) as app:
        kit = make_team(app, "streak")
        w = hook(kit, receiver.url("/flaky"), "/flaky", receiver)
        receiver.expect("/flaky", *[Reply(500)] * 4, Reply(204, body=b""))
        (first,) = emit(app, kit)
        await until(lambda: final(app, kit, first), what="the first delivery to fail")
        seen = app.service.get_webhook(principal=kit.principal(), webhook_id=w.id)
        assert seen.active and seen.failing_since is not None and seen.disabled_reason is None
        (second,) = emit(app, kit, 2)
        await until(lambda: final(app, kit, second), what="the second delivery")
        assert app.service.get_webhook(principal=kit.principal(), webhook_id=w.id).failing_since is None


async def test_a_long_streak_switches_the_webhook_off_and_keeps_its_queue(db_url: str, receiver: Receiver):
    async with running(db_url, disable_after=1.0, retry_schedule=(0.2, 0.2, 0.2)) as app:
        kit = make_team(app, "auto-off")
        w = hook(kit, receiver.url("/down"), "/down", receiver)
        receiver.expect("/down", *[Reply(500)] * 12)
        began = utcnow()
        failed = emit(app, kit, 1) + emit(app, kit, 2) + emit(app, kit, 3)
        for did in failed:
            await until(lambda did=did: final(app, kit, did), what="three deliveries to fail")
        # The fourth waits a minute to be retried (Retry-After): it is open when the switch-off comes.
        receiver.expect("/down", Reply(429, headers={"Retry-After": "60"}))
        (open_one,) = emit(app, kit, 4)
        await until(
            lambda: (found := delivery(app, kit, open_one)) and found[0].state == "retrying",
            what="the fourth delivery to wait for its retry",
        )
        dispatcher = app.service.on_recorded.__self__  # the local dispatcher, through its wake()
        assert dispatcher._scheduler.get_job("disable-failing") is not None
        deadline = time.monotonic() + 20
        while app.service.get_webhook(principal=kit.principal(), webhook_id=w.id).active:
            assert time.monotonic() < deadline, "the webhook was never switched off"
            await dispatcher.disable_failing()
            await anyio.sleep(0.05)
        off = app.service.get_webhook(principal=kit.principal(), webhook_id=w.id)
        assert off.disabled_reason == "failing" and off.failing_since is not None
        d, _ = delivery(app, kit, open_one)
        assert d.state == "failed" and d.note.startswith("cancelled: webhook disabled after failing since ")
        # Nothing is deleted, and switching it on by hand clears the reason; recovery re-sends all.
        assert all(delivery(app, kit, did) is not None for did in [*failed, open_one])
        on = app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": True})
        assert on.active and on.disabled_reason is None and on.failing_since is None
        receiver.expect("/down", *[Reply(204, body=b"")] * 8)
        # failing_since is when the first delivery failed; the deliveries were made before that.
        assert off.failing_since >= began
        recovered = app.service.recover_deliveries(principal=kit.principal(), webhook_id=w.id, since=began)
        assert recovered.count == 4
        for did in recovered.deliveries:
            await until(lambda did=did: final(app, kit, did), what="the recovered deliveries")
        outcomes = {did: delivery(app, kit, did) for did in recovered.deliveries}
        assert {d.state for d, _ in outcomes.values()} == {"succeeded"}, [
            (d.id, d.state, d.note, [(a.status_code, a.error) for a in attempts])
            for d, attempts in outcomes.values()
        ]


async def test_zero_never_switches_anything_off(db_url: str):
    async with running(db_url, disable_after=0.0) as app:
        make_team(app, "never")
        dispatcher = app.service.on_recorded.__self__
        assert dispatcher._scheduler.get_job("disable-failing") is None


def test_the_dashboard_and_admin_area_show_a_switched_off_webhook_and_recover_it(kit):
    """A streak made by hand in the database (three failed deliveries, failing for two days),
    then the store's switch-off: the admin area lists it first, the webhook's page shows the
    banner, and "Enable and recover" switches it on and re-sends the three."""
    from datetime import timedelta

    import httpx
    from sqlalchemy import update
    from starlette.applications import Starlette

    from justscan_mcp.dashboard import SESSION_COOKIE, build_dashboard
    from justscan_mcp.models import Delivery, Webhook
    from tests.conftest import PUBLIC_URL

    app = kit.app
    w = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    ids = [did for n in (1, 2, 3) for did in emit(app, kit, n)]
    now = utcnow()
    with app.store.session(write=True) as s:
        s.execute(update(Delivery).where(Delivery.id.in_(ids)).values(state="failed", next_attempt_at=None))  # type: ignore[attr-defined]
        s.execute(update(Webhook).where(Webhook.id == w.id).values(failing_since=now - timedelta(days=2)))
    # The check is database-wide: other tests' webhooks share this database, so look at ours.
    assert w.id in app.store.disable_failing(started_before=now - timedelta(days=1), now=now)
    overview = app.service.admin_overview()
    assert w.id in [h.id for h in overview.switched_off]

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=Starlette(routes=build_dashboard(app)))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            token, session = app.service.sign_in_with_key(kit.rw.key)
            c.cookies.set(SESSION_COOKIE, token)
            page = await c.get(f"/webhooks/{w.id}")
            assert page.status_code == 200
            assert (
                "Switched off automatically" in page.text and "Enable and recover failed since" in page.text
            )
            done = await c.post(f"/webhooks/{w.id}/enable-recover", data={"csrf": session.csrf_token})
            assert done.status_code == 303, done.text

    anyio.run(scenario)
    on = app.service.get_webhook(principal=kit.principal(), webhook_id=w.id)
    assert on.active and on.disabled_reason is None
    log = app.service.list_deliveries(principal=kit.principal(), webhook_id=w.id).deliveries
    assert sorted(d.redelivery_of for d in log if d.redelivery_of) == sorted(ids)
