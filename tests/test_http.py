"""A real `justscan-mcp serve --transport http` process, driven over streamable HTTP and SSE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from justscan_mcp.errors import StoreUnavailable
from tests.conftest import (
    ALL_TOOLS,
    PUBLIC_URL,
    READ_TOOLS,
    WRITE_TOOLS,
    HttpServer,
    TeamKit,
    child_env,
    free_port,
    make_team,
    spawn_server,
    wait_for,
)

pytestmark = pytest.mark.anyio

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def http_client(server: HttpServer, key: str) -> Client:
    hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return Client(streamable_http_client(f"{server.base}/mcp", http_client=hc))


def sse(server: HttpServer, key: str) -> Client:
    return Client(sse_client(f"{server.base}/sse", headers={"Authorization": f"Bearer {key}"}))


def post_init(server: HttpServer, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.base}/mcp", json=INIT, headers=ACCEPT | headers, timeout=10)


def refusals(server: HttpServer) -> int:
    return server.log.read_text().count('"POST /mcp HTTP/1.1" 401')


def test_healthz(http_server: HttpServer):
    r = httpx.get(f"{http_server.base}/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_no_unknown_or_revoked_key_is_401(http_server: HttpServer, app):
    kit = make_team(app, "h401")
    revoked = kit.key()
    app.service.revoke_api_key(key_id=revoked.id)
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer jsi_" + "z" * 43},
        {"Authorization": f"Bearer {revoked.key}"},
    ):
        r = post_init(http_server, headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error_description"]
    assert httpx.get(f"{http_server.base}/sse", timeout=5).status_code == 401
    for headers in ({}, {"Authorization": "Bearer jsi_" + "z" * 43}):
        r = httpx.post(f"{http_server.base}/messages/?session_id=x", json=INIT, headers=headers)
        assert r.status_code == 401
    assert revoked.key not in http_server.log.read_text()


def test_mcp_disabled_key_is_403_with_a_reason(http_server: HttpServer, kit: TeamKit):
    off = kit.key(mcp_enabled=False)
    r = post_init(http_server, {"Authorization": f"Bearer {off.key}"})
    assert r.status_code == 403
    assert "MCP is not enabled" in r.json()["error_description"]
    assert (
        httpx.get(
            f"{http_server.base}/sse", headers={"Authorization": f"Bearer {off.key}"}, timeout=5
        ).status_code
        == 403
    )


def test_dns_rebinding_checks_stay_on(http_server: HttpServer, kit: TeamKit):
    auth = {"Authorization": f"Bearer {kit.rw.key}"}
    assert post_init(http_server, auth | {"Host": "evil.example.com"}).status_code == 421
    assert post_init(http_server, auth | {"Origin": "http://evil.example.com"}).status_code == 403
    port = http_server.base.rsplit(":", 1)[1]
    assert post_init(http_server, auth | {"Origin": f"http://localhost:{port}"}).status_code == 200


async def test_streamable_http_tools_isolation_and_scopes(http_server: HttpServer, app):
    a, b = make_team(app, "ha"), make_team(app, "hb")
    theirs = b.app.service.create_webhook(principal=b.principal(), url=PUBLIC_URL, events=["scan"])
    async with http_client(http_server, a.rw.key) as c:
        made = await c.call_tool(
            "create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "description": "over http"}
        )
        assert made.is_error is False and made.structured_content["team_id"] == a.team.id
        listed = (await c.call_tool("list_webhooks", {})).structured_content["webhooks"]
        assert [w["id"] for w in listed] == [made.structured_content["id"]]
        # Every tool that takes an id answers another team's id as if it did not exist.
        their_delivery = b.app.service.emit_event(
            team_id=b.team.id, event="scan", data={"qr_code_id": 31, "scan_id": 1}
        ).deliveries[0]
        by_id = {
            "get_webhook": {"webhook_id": theirs.id},
            "update_webhook": {"webhook_id": theirs.id, "active": False},
            "delete_webhook": {"webhook_id": theirs.id},
            "test_webhook": {"webhook_id": theirs.id},
            "list_deliveries": {"webhook_id": theirs.id},
            "get_webhook_stats": {"webhook_id": theirs.id},
            "rotate_secret": {"webhook_id": theirs.id},
            "redeliver": {"delivery_id": their_delivery},
            "recover_deliveries": {"webhook_id": theirs.id, "since": "2026-01-01T00:00:00+00:00"},
        }
        assert sorted([*by_id, "create_webhook", "list_webhooks"]) == ALL_TOOLS
        for call, args in by_id.items():
            foreign = await c.call_tool(call, args)
            assert foreign.is_error and "does not exist" in foreign.content[0].text, call
        unchanged = b.app.store.get_webhook(team_id=b.team.id, webhook_id=theirs.id)
        assert unchanged.active and unchanged.secret == theirs.secret and unchanged.previous_secret is None
        log = b.app.service.list_deliveries(principal=b.principal(), webhook_id=theirs.id).deliveries
        assert [d.id for d in log] == [their_delivery]
    ro = a.key(scopes=["webhooks:read"])
    async with http_client(http_server, ro.key) as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == READ_TOOLS
        refused = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})
        assert refused.is_error and "webhooks:write" in refused.content[0].text
    assert a.webhook_count() == 1 and b.webhook_count() == 1


async def test_revocation_takes_effect_on_the_next_http_call(http_server: HttpServer, kit: TeamKit):
    key = kit.key()
    async with http_client(http_server, key.key) as c:
        assert (await c.call_tool("list_webhooks", {})).is_error is False
        kit.app.service.update_api_key(key_id=key.id, scopes=["webhooks:write"])
        assert sorted(t.name for t in (await c.list_tools()).tools) == WRITE_TOOLS
        kit.app.service.revoke_api_key(key_id=key.id)
        before = refusals(http_server)
        # The SDK client reports any HTTP error status as a generic MCPError; the log shows it was a 401.
        with pytest.raises(MCPError):
            await c.call_tool("list_webhooks", {})
        assert refusals(http_server) == before + 1


async def test_sse_transport_with_bearer_key(http_server: HttpServer, app):
    a, b = make_team(app, "sa"), make_team(app, "sb")
    theirs = b.app.service.create_webhook(principal=b.principal(), url=PUBLIC_URL, events=["scan"])
    async with sse(http_server, a.rw.key) as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == ALL_TOOLS
        made = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["file_download"]})
        assert made.is_error is False
        foreign = await c.call_tool("delete_webhook", {"webhook_id": theirs.id})
        assert foreign.is_error
        gone = await c.call_tool("delete_webhook", {"webhook_id": made.structured_content["id"]})
        assert gone.structured_content["deleted"] is True
        a.app.service.update_api_key(key_id=a.rw.id, mcp_enabled=False)
        # The SSE stream was opened while MCP was on; the next call is refused, with the reason.
        with pytest.raises(MCPError, match="MCP is not enabled"):
            await c.call_tool("list_webhooks", {})
        a.app.service.update_api_key(key_id=a.rw.id, mcp_enabled=True)
        a.app.service.revoke_api_key(key_id=a.rw.id)
        with pytest.raises(MCPError, match="revoked"):
            await c.list_tools()
    ro = a.key(scopes=["webhooks:read"])
    async with sse(http_server, ro.key) as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == READ_TOOLS
    assert b.webhook_count() == 1 and a.webhook_count() == 0


def test_allowed_host_flag_admits_a_public_host_name(db_url: str, app, tmp_path):
    kit = make_team(app, "proxy")
    with spawn_server(
        child_env(db_url), tmp_path / "log", "--allowed-host", "mcp.justscan.example"
    ) as server:
        auth = {"Authorization": f"Bearer {kit.rw.key}"}
        public = {"Host": "mcp.justscan.example", "Origin": "https://mcp.justscan.example"}
        ok = httpx.post(f"{server.base}/mcp", json=INIT, headers=ACCEPT | auth | public)
        assert ok.status_code == 200
        assert "justscan-webhooks" in json.dumps(ok.text)
        bad = httpx.post(f"{server.base}/mcp", json=INIT, headers=ACCEPT | auth | {"Host": "other.example"})
        assert bad.status_code == 421


def test_server_started_while_database_is_down_waits_then_recovers(db_url: str, tmp_path):
    """SPEC: started while the database is unreachable, the server keeps retrying with backoff and
    says so in its log; it does not exit. It serves 503 meanwhile and stops cleanly on SIGTERM."""
    from sqlalchemy.engine import make_url

    from tests.tcpproxy import TcpProxy

    if not db_url.startswith("postgresql"):
        pytest.skip("an unreachable database needs a network database")
    real = make_url(db_url)
    gap = free_port()
    proxied = real.set(host="127.0.0.1", port=gap).render_as_string(hide_password=False)
    proxy = TcpProxy(gap, (real.host or "127.0.0.1", real.port or 5432))
    log = tmp_path / "log"
    try:
        with spawn_server(child_env(proxied), log, wait_healthy=False) as server:
            wait_for(lambda: log.read_text().count("not reachable") >= 2, what="retry messages in the log")
            assert server.proc.poll() is None
            wait_for(
                lambda: httpx.get(f"{server.base}/healthz", timeout=2).status_code == 503, what="503 health"
            )
            assert post_init(server, {}).status_code == 503
            # A REST client sees the public sentence, never the driver's words (host, port).
            rest = httpx.get(
                f"{server.base}/api/v1/webhooks", headers={"Authorization": "Bearer jsi_" + "x" * 43}
            )
            assert rest.status_code == 503
            assert rest.json()["message"] == StoreUnavailable.PUBLIC
            assert str(gap) not in rest.text and "connection" not in rest.text.lower()
            proxy.start()
            wait_for(
                lambda: httpx.get(f"{server.base}/healthz", timeout=2).status_code == 200,
                timeout=60,
                what="recovery",
            )
        assert (
            server.proc.returncode is not None and server.proc.returncode != -9
        )  # stopped by SIGTERM, not killed
    finally:
        proxy.stop()


def test_hosted_agent_example_runs_against_the_server(http_server: HttpServer, kit: TeamKit):
    example = Path(__file__).parents[1] / "examples" / "hosted_agent.py"
    proc = subprocess.run(
        [sys.executable, str(example)],
        env=child_env("unused") | {"JUSTSCAN_URL": f"{http_server.base}/mcp", "JUSTSCAN_API_KEY": kit.rw.key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (tools_line,) = [line for line in proc.stdout.splitlines() if line.startswith("tools: ")]
    assert sorted(tools_line.removeprefix("tools: ").split(", ")) == ALL_TOOLS
    assert "created webhook" in proc.stdout and "deleted webhook" in proc.stdout
    assert kit.webhook_count() == 0


def test_claude_desktop_example_is_valid_and_launches_serve():
    config = json.loads((Path(__file__).parents[1] / "examples" / "claude_desktop_config.json").read_text())
    server = config["mcpServers"]["justscan"]
    assert server["args"] == ["serve"] and "JUSTSCAN_API_KEY" in server["env"]


async def test_streamable_http_reads_the_key_once_a_request_and_sse_messages_read_it_again(
    app, kit: TeamKit, monkeypatch: pytest.MonkeyPatch
):
    """Over streamable HTTP the key is authenticated by the HTTP layer on every request; the MCP
    gate re-read it by id for every message as well (a second thread hop and query, a third to a
    half of a `list_webhooks` call's server time here). It now takes the caller checked for that
    very request. An SSE message is only identified by the HTTP layer, so there the gate still
    reads the key itself: revocation and the MCP switch reach an open SSE session. In process
    (uvicorn in this event loop), to count the reads."""
    import anyio
    import uvicorn

    from justscan_mcp.http_server import build_http_app

    gate_reads: list[int] = []
    real = app.service.principal_for_key_id

    def counted(key_id: int) -> Any:
        gate_reads.append(key_id)
        return real(key_id)

    monkeypatch.setattr(app.service, "principal_for_key_id", counted)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_http_app(app, port=port, dispatcher=False), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    base = f"http://127.0.0.1:{port}"
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(30):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {kit.rw.key}"}, timeout=30)
            async with Client(streamable_http_client(f"{base}/mcp", http_client=hc)) as c:
                assert sorted(t.name for t in (await c.list_tools()).tools) == ALL_TOOLS
                for _ in range(3):
                    assert (await c.call_tool("list_webhooks", {})).is_error is False
            assert gate_reads == [], f"the gate read the key again {len(gate_reads)} times"
            async with Client(
                sse_client(f"{base}/sse", headers={"Authorization": f"Bearer {kit.rw.key}"})
            ) as c:
                before = len(gate_reads)
                assert (await c.call_tool("list_webhooks", {})).is_error is False
                assert len(gate_reads) > before
                kit.app.service.update_api_key(key_id=kit.rw.id, mcp_enabled=False)
                with pytest.raises(MCPError, match="MCP is not enabled"):
                    await c.call_tool("list_webhooks", {})
        finally:
            server.should_exit = True
