"""Confirmation before destructive tools: a client that can ask the person (elicitation) is asked
before delete_webhook, rotate_secret and recover_deliveries; declining or cancelling changes
nothing and says so; every answer is in the audit log. A client without elicitation proceeds."""

from __future__ import annotations

from datetime import timedelta

import pytest
from mcp import Client
from mcp.types import ElicitResult

from justscan_mcp.mcp_server import build_mcp_server
from justscan_mcp.models import utcnow
from tests.conftest import PUBLIC_URL, TeamKit

pytestmark = pytest.mark.anyio


class Person:
    """The user behind an elicitation-capable client: answers each question with `action`."""

    def __init__(self, action: str, confirm: bool = True) -> None:
        self.action = action
        self.confirm = confirm
        self.asked: list[str] = []

    async def __call__(self, context, params) -> ElicitResult:
        self.asked.append(params.message)
        content = {"confirm": self.confirm} if self.action == "accept" else None
        return ElicitResult(action=self.action, content=content)  # type: ignore[arg-type]


def client(kit: TeamKit, person: Person | None) -> Client:
    server = build_mcp_server(kit.app, fixed_key_id=kit.rw.id)
    return Client(server, elicitation_callback=person) if person else Client(server)


def hook(kit: TeamKit) -> int:
    return kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"]).id


def log_for(kit: TeamKit, webhook_id: int) -> list[tuple[str, str]]:
    return [
        (c.tool, c.answer)
        for c in kit.app.service.recent_confirmations(limit=1000)
        if c.webhook_id == webhook_id
    ]


@pytest.mark.parametrize("action", ["decline", "cancel"])
async def test_declining_or_cancelling_a_delete_changes_nothing_and_says_so(kit: TeamKit, action: str):
    wid = hook(kit)
    person = Person(action)
    async with client(kit, person) as c:
        result = await c.call_tool("delete_webhook", {"webhook_id": wid})
    assert result.is_error and "Nothing changed" in result.content[0].text
    assert ("declined" if action == "decline" else "cancelled") in result.content[0].text
    assert person.asked and PUBLIC_URL in person.asked[0] and f"#{wid}" in person.asked[0]
    assert kit.app.service.get_webhook(principal=kit.principal(), webhook_id=wid).id == wid
    assert log_for(kit, wid) == [("delete_webhook", action)]


async def test_accepting_deletes_and_an_unticked_box_counts_as_no(kit: TeamKit):
    wid, kept = hook(kit), hook(kit)
    async with client(kit, Person("accept", confirm=False)) as c:
        refused = await c.call_tool("delete_webhook", {"webhook_id": kept})
    assert refused.is_error and log_for(kit, kept) == [("delete_webhook", "decline")]
    async with client(kit, Person("accept")) as c:
        done = await c.call_tool("delete_webhook", {"webhook_id": wid})
    assert done.is_error is False and done.structured_content == {"deleted": True, "webhook_id": wid}
    assert log_for(kit, wid) == [("delete_webhook", "accept")]


async def test_a_client_without_elicitation_proceeds_unasked(kit: TeamKit):
    wid = hook(kit)
    async with client(kit, None) as c:
        rotated = await c.call_tool("rotate_secret", {"webhook_id": wid})
        deleted = await c.call_tool("delete_webhook", {"webhook_id": wid})
    assert rotated.is_error is False and deleted.is_error is False
    assert log_for(kit, wid) == []


async def test_rotation_is_asked_and_a_recovery_names_its_count_from_a_dry_run(kit: TeamKit):
    wid = hook(kit)
    person = Person("accept")
    async with client(kit, person) as c:
        assert (await c.call_tool("rotate_secret", {"webhook_id": wid})).is_error is False
        since = (utcnow() - timedelta(hours=1)).isoformat()
        # Nothing failed yet: nothing to confirm, and a dry run is never asked either.
        assert (
            await c.call_tool("recover_deliveries", {"webhook_id": wid, "since": since})
        ).is_error is False
        ids = [
            kit.app.service.emit_event(
                team_id=kit.team.id, event="scan", data={"qr_code_id": 77, "scan_id": n}
            ).deliveries[0]
            for n in (1, 2, 3)
        ]
        kit.app.service.update_webhook(principal=kit.principal(), webhook_id=wid, changes={"active": False})
        kit.app.service.update_webhook(principal=kit.principal(), webhook_id=wid, changes={"active": True})
        assert all(
            kit.app.store.get_delivery(team_id=kit.team.id, delivery_id=i)[0].state == "failed" for i in ids
        )
        dry = await c.call_tool("recover_deliveries", {"webhook_id": wid, "since": since, "dry_run": True})
        assert dry.structured_content["count"] == 3
        asked_before = len(person.asked)
        done = await c.call_tool("recover_deliveries", {"webhook_id": wid, "since": since})
    assert done.is_error is False and done.structured_content["count"] == 3
    assert len(person.asked) == asked_before + 1 and person.asked[-1].startswith(
        "Re-send 3 failed deliveries"
    )
    assert "new signing secret" in person.asked[0]
    assert log_for(kit, wid) == [("recover_deliveries", "accept"), ("rotate_secret", "accept")]


async def test_an_unknown_webhook_is_refused_before_anyone_is_asked(kit: TeamKit):
    person = Person("accept")
    async with client(kit, person) as c:
        result = await c.call_tool("delete_webhook", {"webhook_id": 987654321})
    assert result.is_error and "does not exist" in result.content[0].text and person.asked == []


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_over_http_in_both_protocol_eras(http_server, kit: TeamKit, mode: str):
    """The handshake era asks over the session's back-channel during the call; 2026-07-28 answers
    input_required and the client retries with the answer."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    def connect(person: Person) -> Client:
        hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kit.rw.key}"}, timeout=30)
        return Client(
            streamable_http_client(f"{http_server.base}/mcp", http_client=hc),
            mode=mode,
            elicitation_callback=person,
        )

    wid = hook(kit)
    no = Person("decline")
    async with connect(no) as c:
        refused = await c.call_tool("delete_webhook", {"webhook_id": wid})
    assert refused.is_error and "declined" in refused.content[0].text and len(no.asked) == 1
    yes = Person("accept")
    async with connect(yes) as c:
        done = await c.call_tool("delete_webhook", {"webhook_id": wid})
    assert done.is_error is False and done.structured_content["deleted"] is True
    assert log_for(kit, wid) == [("delete_webhook", "accept"), ("delete_webhook", "decline")]


async def test_recovery_and_a_test_delivery_report_progress(kit: TeamKit):
    wid = hook(kit)
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total, message))

    since = (utcnow() - timedelta(hours=1)).isoformat()
    async with client(kit, None) as c:
        result = await c.call_tool(
            "recover_deliveries",
            {"webhook_id": wid, "since": since, "dry_run": True},
            progress_callback=progress,
        )
    assert result.is_error is False
    assert seen == [(0, 1, "finding the failed deliveries to re-send"), (1, 1, "would re-send 0 deliveries")]
