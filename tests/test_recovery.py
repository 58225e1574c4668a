"""Bulk recovery after an outage: `recover_deliveries` re-sends a webhook's failed deliveries of a
time window, once per event, on both databases, through the service, MCP and REST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from mcp import Client

from justscan_mcp.errors import Conflict
from justscan_mcp.mcp_server import build_mcp_server
from justscan_mcp.rest_api import build_rest_api
from justscan_mcp.service import deliveries as delivery_use_cases
from tests.conftest import PUBLIC_URL, TeamKit


def failed_deliveries(kit: TeamKit, n: int, first: int = 1):
    """`n` scans whose deliveries to one webhook ended `failed` (cancelled by a deactivation,
    as an outage's end would leave them), with the webhook switched back on."""
    svc = kit.app.service
    hooks = svc.list_webhooks(principal=kit.principal()).webhooks
    hook = (
        hooks[0] if hooks else svc.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    )
    ids = []
    for i in range(first, first + n):
        ids += svc.emit_event(
            team_id=kit.team.id, event="scan", data={"qr_code_id": i, "scan_id": i}
        ).deliveries
    svc.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": False})
    svc.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": True})
    return hook, ids


def deliveries_of(kit: TeamKit, hook_id: int):
    return kit.app.service.list_deliveries(
        principal=kit.principal(), webhook_id=hook_id, limit=100
    ).deliveries


def test_dry_run_counts_and_writes_nothing(kit: TeamKit):
    hook, failed = failed_deliveries(kit, 3)
    before = len(deliveries_of(kit, hook.id))
    result = kit.app.service.recover_deliveries(
        principal=kit.principal(),
        webhook_id=hook.id,
        since=datetime.now(UTC) - timedelta(hours=1),
        dry_run=True,
    )
    assert (result.count, result.deliveries, result.more, result.dry_run) == (3, sorted(failed), False, True)
    assert len(deliveries_of(kit, hook.id)) == before


def test_recovery_resends_each_failed_event_once_and_never_twice(kit: TeamKit):
    hook, failed = failed_deliveries(kit, 3)
    since = datetime.now(UTC) - timedelta(hours=1)
    svc = kit.app.service
    done = svc.recover_deliveries(principal=kit.principal(), webhook_id=hook.id, since=since)
    assert done.count == 3 and not done.more
    copies = {d.id: d for d in deliveries_of(kit, hook.id) if d.id in done.deliveries}
    assert sorted(d.redelivery_of for d in copies.values()) == sorted(failed)
    assert {d.state for d in copies.values()} == {"pending"}
    # On their way: a second call sends nothing again.
    again = svc.recover_deliveries(principal=kit.principal(), webhook_id=hook.id, since=since)
    assert (again.count, again.deliveries) == (0, [])
    # A failed redelivery does not make its event count twice either.
    svc.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": False})
    svc.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": True})
    third = svc.recover_deliveries(principal=kit.principal(), webhook_id=hook.id, since=since)
    assert third.count == 3
    assert sorted(d.redelivery_of for d in deliveries_of(kit, hook.id) if d.id in third.deliveries) == sorted(
        failed
    )


def test_the_window_is_since_inclusive_until_exclusive(kit: TeamKit):
    hook, early = failed_deliveries(kit, 2)
    middle = datetime.now(UTC)
    _, late = failed_deliveries(kit, 3, first=10)
    svc = kit.app.service
    only_late = svc.recover_deliveries(
        principal=kit.principal(), webhook_id=hook.id, since=middle, dry_run=True
    )
    assert only_late.deliveries == sorted(late)
    only_early = svc.recover_deliveries(
        principal=kit.principal(),
        webhook_id=hook.id,
        since=middle - timedelta(hours=1),
        until=middle,
        dry_run=True,
    )
    assert only_early.deliveries == sorted(early)


def test_past_the_limit_it_says_more_and_the_same_call_continues(
    kit: TeamKit, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(delivery_use_cases, "RECOVERY_LIMIT", 2)
    hook, failed = failed_deliveries(kit, 5)
    since = datetime.now(UTC) - timedelta(hours=1)
    svc = kit.app.service
    sent = []
    for expected_more in (True, True, False):
        page = svc.recover_deliveries(principal=kit.principal(), webhook_id=hook.id, since=since)
        assert page.more is expected_more and page.count <= 2
        sent += page.deliveries
    assert len(sent) == 5
    originals = sorted(d.redelivery_of for d in deliveries_of(kit, hook.id) if d.id in sent)
    assert originals == sorted(failed)


def test_an_inactive_webhook_is_refused_naming_active_and_nothing_is_sent(kit: TeamKit):
    hook, _ = failed_deliveries(kit, 2)
    svc = kit.app.service
    svc.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": False})
    before = len(deliveries_of(kit, hook.id))
    with pytest.raises(Conflict) as err:
        svc.recover_deliveries(
            principal=kit.principal(), webhook_id=hook.id, since=datetime.now(UTC) - timedelta(days=1)
        )
    assert err.value.field == "active"
    assert len(deliveries_of(kit, hook.id)) == before


@pytest.mark.anyio
async def test_over_mcp_and_rest(kit: TeamKit):
    hook, _ = failed_deliveries(kit, 2)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    async with Client(build_mcp_server(kit.app, fixed_key_id=kit.rw.id)) as c:
        dry = await c.call_tool(
            "recover_deliveries", {"webhook_id": hook.id, "since": since, "dry_run": True}
        )
        assert dry.is_error is False and dry.structured_content["count"] == 2
        naive = await c.call_tool(
            "recover_deliveries", {"webhook_id": hook.id, "since": "2026-01-01T00:00:00"}
        )
        assert naive.is_error and "since" in naive.content[0].text
    transport = httpx.ASGITransport(app=build_rest_api(kit.app))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as rest:
        auth = {"Authorization": f"Bearer {kit.rw.key}"}
        r = await rest.post(f"/webhooks/{hook.id}/recover", json={"since": since}, headers=auth)
        assert r.status_code == 200 and r.json()["count"] == 2 and r.json()["more"] is False, r.text
        bad = await rest.post(f"/webhooks/{hook.id}/recover", json={"since": "yesterday"}, headers=auth)
        assert bad.status_code == 422 and bad.json()["field"] == "since"
        kit.app.service.update_webhook(
            principal=kit.principal(), webhook_id=hook.id, changes={"active": False}
        )
        off = await rest.post(f"/webhooks/{hook.id}/recover", json={"since": since}, headers=auth)
        assert off.status_code == 409 and off.json()["field"] == "active"
