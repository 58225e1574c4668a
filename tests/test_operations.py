"""The operation table is the one place a scope is declared: this walks it, and checks that every
MCP tool, REST route and dashboard action enforces exactly the declared scope. A key with every
scope but the declared one is refused, naming that scope; a key with only the declared scope is
not refused for scope. A forgotten or wrong scope anywhere fails here.

Calls use ids that do not exist, so a call that passes the gate ends in "not found" and changes
nothing (the scope is checked before the id is looked up)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp import Client
from starlette.applications import Starlette

from justscan_mcp.app import App
from justscan_mcp.dashboard import KEY_ROUTES, SESSION_COOKIE, WEBHOOK_ACTIONS, build_dashboard
from justscan_mcp.mcp_server import build_mcp_server
from justscan_mcp.models import SCOPES
from justscan_mcp.rest_api import build_rest_api
from justscan_mcp.service.operations import BY_NAME, OPERATIONS, Operation
from tests.conftest import PUBLIC_URL, TeamKit

pytestmark = pytest.mark.anyio

MISSING = 10**12
ARGS: dict[str, dict[str, Any]] = {
    "create_webhook": {"url": PUBLIC_URL, "events": ["scan"]},
    "list_webhooks": {},
    "get_webhook": {"webhook_id": MISSING},
    "update_webhook": {"webhook_id": MISSING, "description": "changed"},
    "delete_webhook": {"webhook_id": MISSING},
    "test_webhook": {"webhook_id": MISSING},
    "list_deliveries": {"webhook_id": MISSING},
    "get_webhook_stats": {"webhook_id": MISSING, "hours": 6},
    "redeliver": {"delivery_id": MISSING},
    "rotate_secret": {"webhook_id": MISSING},
    "recover_deliveries": {"webhook_id": MISSING, "since": "2026-01-01T00:00:00+00:00"},
    "emit_event": {"event": "scan", "data": {"qr_code_id": 1, "scan_id": 1}},
    "emit_events": {"events": [{"event": "scan", "data": {"qr_code_id": 1, "scan_id": 1}}]},
}
# SPEC's scopes, pinned: changing one is a change of the contract, made here and in the table.
SPEC_SCOPES = {
    "create_webhook": "webhooks:write",
    "list_webhooks": "webhooks:read",
    "get_webhook": "webhooks:read",
    "update_webhook": "webhooks:write",
    "delete_webhook": "webhooks:write",
    "test_webhook": "webhooks:write",
    "list_deliveries": "webhooks:read",
    "get_webhook_stats": "webhooks:read",
    "redeliver": "webhooks:write",
    "rotate_secret": "webhooks:write",
    "recover_deliveries": "webhooks:write",
    "emit_event": "events:write",
    "emit_events": "events:write",
}
FORMS: dict[str, dict[str, Any]] = {
    "/webhooks": {"url": PUBLIC_URL, "events": ["scan"]},
    "/edit": {"url": PUBLIC_URL, "events": ["scan"], "description": "changed"},
    "/active": {"active": "false"},
}


def without(scope: str) -> list[str]:
    return [s for s in SCOPES if s != scope]


def refusal_names(text: str, scope: str) -> bool:
    return f"'{scope}'" in text and "lacks" in text


def test_every_operation_is_declared_whole():
    assert sorted(ARGS) == sorted(BY_NAME), "a new operation needs its arguments here"
    assert {op.name: op.scope for op in OPERATIONS} == SPEC_SCOPES
    for op in OPERATIONS:
        assert op.scope in SCOPES
        assert op.title and len(op.description) > 40
        assert op.route.path.startswith("/")
        for name in re.findall(r"{(\w+)}", op.route.path):
            assert name in op.input.model_fields, (op.name, name)
    assert set(WEBHOOK_ACTIONS.values()) <= set(BY_NAME)
    assert {op for _, _, op in KEY_ROUTES} <= set(BY_NAME)


@pytest.mark.parametrize("op", [op for op in OPERATIONS if op.mcp_tool], ids=lambda op: op.name)
async def test_each_mcp_tool_enforces_its_declared_scope(kit: TeamKit, op: Operation):
    lacking = kit.key(scopes=without(op.scope))
    async with Client(build_mcp_server(kit.app, fixed_key_id=lacking.id)) as c:
        assert op.name not in [t.name for t in (await c.list_tools()).tools]
        refused = await c.call_tool(op.name, ARGS[op.name])
        assert refused.is_error and refusal_names(refused.content[0].text, op.scope), refused
    only = kit.key(scopes=[op.scope])
    async with Client(build_mcp_server(kit.app, fixed_key_id=only.id)) as c:
        assert op.name in [t.name for t in (await c.list_tools()).tools]
        result = await c.call_tool(op.name, ARGS[op.name])
        text = result.content[0].text if result.content else ""
        assert not refusal_names(text, op.scope), text
        assert not result.is_error or "does not exist" in text, text


def rest_request(op: Operation) -> tuple[str, str, dict[str, Any]]:
    args = dict(ARGS[op.name])
    path = op.route.path
    for name in re.findall(r"{(\w+)}", path):
        path = path.replace(f"{{{name}}}", str(args.pop(name)))
    kwargs: dict[str, Any] = {}
    if op.route.body is not None:
        kwargs["json"] = args
    elif args:
        kwargs["params"] = args
    return op.route.method, path, kwargs


@pytest.fixture
async def rest(app: App) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_rest_api(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
async def test_each_rest_route_enforces_its_declared_scope(
    rest: httpx.AsyncClient, kit: TeamKit, op: Operation
):
    method, path, kwargs = rest_request(op)
    lacking = kit.key(scopes=without(op.scope), mcp_enabled=False)
    r = await rest.request(method, path, headers={"Authorization": f"Bearer {lacking.key}"}, **kwargs)
    assert r.status_code == 403 and refusal_names(r.json()["message"], op.scope), r.text
    only = kit.key(scopes=[op.scope], mcp_enabled=False)
    r = await rest.request(method, path, headers={"Authorization": f"Bearer {only.key}"}, **kwargs)
    assert r.status_code in (op.route.status, 404), r.text
    doc = build_rest_api(kit.app).openapi()
    declared = doc["paths"][op.route.path][op.route.method.lower()]["security"]
    assert declared == [{"bearerAuth": [op.scope]}]


@pytest.fixture
async def dashboard(app: App) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=Starlette(routes=build_dashboard(app)))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def as_key(client: httpx.AsyncClient, kit: TeamKit, scopes: list[str]) -> str:
    key = kit.key(scopes=scopes)
    token, session = kit.app.service.sign_in_with_key(key.key)
    client.cookies.set(SESSION_COOKIE, token)
    return session.csrf_token


@pytest.mark.parametrize("route", KEY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
async def test_each_dashboard_action_enforces_its_declared_scope(
    dashboard: httpx.AsyncClient, kit: TeamKit, route: tuple[str, str, str]
):
    method, template, operation = route
    scope = BY_NAME[operation].scope
    path = template.replace("{webhook_id}", str(MISSING)).replace("{delivery_id}", str(MISSING))
    form = next((f for suffix, f in FORMS.items() if template.endswith(suffix)), {})

    async def send(csrf: str) -> httpx.Response:
        if method == "GET":
            return await dashboard.get(path)
        return await dashboard.post(path, data={**form, "csrf": csrf})

    refused = await send(await as_key(dashboard, kit, without(scope)))
    assert refused.status_code == 403 and refusal_names(refused.text.replace("&#39;", "'"), scope), (
        refused.text
    )
    allowed = await send(await as_key(dashboard, kit, [scope]))
    assert not refusal_names(allowed.text.replace("&#39;", "'"), scope), allowed.text
    assert allowed.status_code in (200, 201, 303, 404), allowed.text
