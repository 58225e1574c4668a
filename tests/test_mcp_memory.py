"""MCP tool logic through the SDK's in-memory Client, on both stores."""

from __future__ import annotations

from datetime import timedelta

import pytest
from mcp import Client, MCPError

from justscan_mcp.app import App
from justscan_mcp.mcp_server import build_mcp_server
from justscan_mcp.service import Service
from tests.conftest import ALL_TOOLS, PUBLIC_URL, READ_TOOLS, WRITE_TOOLS, TeamKit

pytestmark = pytest.mark.anyio


def client(kit: TeamKit, key=None, app: App | None = None) -> Client:
    return Client(build_mcp_server(app or kit.app, fixed_key_id=(key or kit.rw).id))


async def tool_names(c: Client) -> list[str]:
    return sorted(t.name for t in (await c.list_tools()).tools)


async def test_tools_list_follows_scopes(kit: TeamKit):
    async with client(kit) as c:
        assert await tool_names(c) == ALL_TOOLS
    async with client(kit, kit.key(scopes=["webhooks:read"])) as c:
        assert await tool_names(c) == READ_TOOLS
    async with client(kit, kit.key(scopes=["webhooks:write"])) as c:
        assert await tool_names(c) == WRITE_TOOLS
    async with client(kit, kit.key(scopes=["events:write"])) as c:
        assert await tool_names(c) == []


async def test_schemas_constraints_output_and_annotations(kit: TeamKit):
    async with client(kit) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.output_schema and tool.output_schema.get("type") == "object"
        # Only test_webhook, redeliver and recover_deliveries reach outside (they POST to
        # receivers); the rest touch our store.
        assert tool.annotations is not None
        assert tool.annotations.open_world_hint is (
            tool.name in ("test_webhook", "redeliver", "recover_deliveries")
        )
    create = tools["create_webhook"].input_schema["properties"]
    assert create["url"]["maxLength"] == 2048 and create["url"]["format"] == "uri"
    assert create["events"]["minItems"] == 1 and create["events"]["uniqueItems"] is True
    assert sorted(create["events"]["items"]["enum"]) == ["file_download", "first_scan", "form_submit", "scan"]
    assert tools["create_webhook"].input_schema["required"] == ["url", "events"]
    assert "secret" in tools["create_webhook"].output_schema["properties"]
    lst = tools["list_webhooks"].input_schema["properties"]
    assert (lst["limit"]["minimum"], lst["limit"]["maximum"], lst["limit"]["default"]) == (1, 100, 20)
    assert tools["delete_webhook"].input_schema["properties"]["webhook_id"]["minimum"] == 1
    assert "secret" not in str(tools["list_webhooks"].output_schema)
    ann = {name: t.annotations for name, t in tools.items()}
    assert ann["list_webhooks"].read_only_hint is True
    assert ann["create_webhook"].read_only_hint is False and ann["create_webhook"].destructive_hint is False
    assert ann["delete_webhook"].destructive_hint is True and ann["delete_webhook"].idempotent_hint is True


async def test_create_list_delete_with_structured_results(kit: TeamKit):
    async with client(kit) as c:
        made = await c.call_tool(
            "create_webhook", {"url": PUBLIC_URL, "events": ["scan", "form_submit"], "description": "CRM"}
        )
        assert made.is_error is False
        hook = made.structured_content
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["scan", "form_submit"]
        assert hook["team_id"] == kit.team.id
        listed = await c.call_tool("list_webhooks", {})
        assert listed.is_error is False
        assert [w["id"] for w in listed.structured_content["webhooks"]] == [hook["id"]]
        assert hook["secret"] not in str(listed.model_dump())
        gone = await c.call_tool("delete_webhook", {"webhook_id": hook["id"]})
        assert gone.structured_content == {"deleted": True, "webhook_id": hook["id"]}
        again = await c.call_tool("delete_webhook", {"webhook_id": hook["id"]})
        assert again.is_error and "does not exist" in again.content[0].text
    assert kit.webhook_count() == 0


async def test_pagination_over_mcp(kit: TeamKit):
    async with client(kit) as c:
        ids = [
            (await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})).structured_content[
                "id"
            ]
            for _ in range(5)
        ]
        seen, cursor = [], None
        while True:
            args = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await c.call_tool("list_webhooks", args)).structured_content
            seen += [w["id"] for w in page["webhooks"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == ids


BAD_CALLS = [
    ("create_webhook", {"url": "ftp://93.184.216.34/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "/hooks", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://93.184.216.34/" + "a" * 2048, "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://127.0.0.1/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://10.1.2.3/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://169.254.169.254/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://[::1]/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": "https://nowhere.example.test/x", "events": ["scan"]}, "url"),
    ("create_webhook", {"url": PUBLIC_URL, "events": ["scan2"]}, "events"),
    ("create_webhook", {"url": PUBLIC_URL, "events": []}, "events"),
    ("create_webhook", {"url": PUBLIC_URL, "events": ["scan", "scan"]}, "events"),
    ("create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "description": "d" * 501}, "description"),
    ("create_webhook", {"events": ["scan"]}, "url"),
    ("create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "rate_limit": 0}, "rate_limit"),
    ("create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "rate_limit": 5000}, "rate_limit"),
    ("delete_webhook", {"webhook_id": -1}, "webhook_id"),
    ("delete_webhook", {"webhook_id": 987654321}, "webhook 987654321 does not exist"),
    ("list_webhooks", {"limit": 0}, "limit"),
    ("list_webhooks", {"limit": 1000}, "limit"),
    ("list_webhooks", {"cursor": "forged.cursor"}, "cursor"),
]


@pytest.mark.parametrize("tool,args,field", BAD_CALLS)
async def test_bad_input_is_a_tool_error_naming_the_field(kit: TeamKit, tool: str, args: dict, field: str):
    async with client(kit) as c:
        result = await c.call_tool(tool, args)
    assert result.is_error is True
    prefix, _, text = result.content[0].text.partition(": ")
    assert prefix == f"Error executing tool {tool}"
    assert field in text, text
    assert kit.webhook_count() == 0


async def test_stale_cursor_is_refused(kit: TeamKit):
    svc = kit.app.service
    for _ in range(2):
        svc.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    cursor = svc.list_webhooks(principal=kit.principal(), limit=1).next_cursor
    later = App(
        settings=kit.app.settings,
        store=kit.app.store,
        service=Service(
            kit.app.store,
            kit.app.settings,
            resolver=svc.resolver,
            clock=lambda: svc.clock() + timedelta(days=2),
        ),
    )
    async with client(kit, app=later) as c:
        result = await c.call_tool("list_webhooks", {"cursor": cursor})
    assert result.is_error and "cursor" in result.content[0].text and "expired" in result.content[0].text


async def test_foreign_webhook_answers_like_a_missing_one(kit: TeamKit, other: TeamKit):
    theirs = other.app.service.create_webhook(principal=other.principal(), url=PUBLIC_URL, events=["scan"])
    async with client(kit) as c:
        foreign = await c.call_tool("delete_webhook", {"webhook_id": theirs.id})
        missing = await c.call_tool("delete_webhook", {"webhook_id": 10**15})
        listed = await c.call_tool("list_webhooks", {})
    assert foreign.is_error and missing.is_error
    assert foreign.content[0].text.replace(str(theirs.id), "N") == missing.content[0].text.replace(
        str(10**15), "N"
    )
    assert listed.structured_content["webhooks"] == []
    assert other.webhook_count() == 1


async def test_read_only_key_cannot_create_and_is_told_the_scope(kit: TeamKit):
    async with client(kit, kit.key(scopes=["webhooks:read"])) as c:
        result = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})
    assert result.is_error and "webhooks:write" in result.content[0].text
    assert kit.webhook_count() == 0


async def test_revocation_mcp_switch_and_scopes_apply_on_the_next_call(kit: TeamKit):
    key = kit.key()
    svc = kit.app.service
    async with client(kit, key) as c:
        assert (await c.call_tool("list_webhooks", {})).is_error is False
        svc.update_api_key(key_id=key.id, scopes=["webhooks:read"])
        assert await tool_names(c) == READ_TOOLS
        svc.update_api_key(key_id=key.id, mcp_enabled=False)
        with pytest.raises(MCPError, match="MCP is not enabled"):
            await c.call_tool("list_webhooks", {})
        with pytest.raises(MCPError, match="MCP is not enabled"):
            await c.list_tools()
        svc.update_api_key(key_id=key.id, mcp_enabled=True)
        assert (await c.call_tool("list_webhooks", {})).is_error is False
        svc.revoke_api_key(key_id=key.id)
        with pytest.raises(MCPError, match="revoked"):
            await c.call_tool("list_webhooks", {})
