"""Each protocol revision with a real client against a real `serve --transport http`: the SDK's
client in 2026-07-28 (stateless, per-request envelope) and in the initialize handshake
(2025-11-25), and a raw 2025-06-18 client, all with a bearer key."""

from __future__ import annotations

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import HttpServer, TeamKit


def _client(server: HttpServer, key: str, mode: str) -> Client:
    hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return Client(streamable_http_client(f"{server.base}/mcp", http_client=hc), mode=mode)  # type: ignore[arg-type]


def _session_version(c: Client) -> str | None:
    session = c.session
    for name in ("protocol_version", "negotiated_protocol_version"):
        value = getattr(session, name, None)
        if isinstance(value, str):
            return value
    return None


def test_the_sdk_client_in_each_mode(http_server: HttpServer, kit: TeamKit):
    async def run(mode: str) -> tuple[str | None, list[str], bool]:
        async with _client(http_server, kit.rw.key, mode) as c:
            tools = sorted(t.name for t in (await c.list_tools()).tools)
            listed = await c.call_tool("list_webhooks", {})
            return _session_version(c), tools, listed.is_error

    for mode, expected in (("2026-07-28", "2026-07-28"), ("legacy", "2025-11-25"), ("auto", "2026-07-28")):
        version, tools, failed = anyio.run(run, mode)
        assert "create_webhook" in tools and failed is False, mode
        assert version == expected, (mode, version)


def test_a_2025_06_18_client_keeps_working(http_server: HttpServer, kit: TeamKit):
    headers = {
        "Authorization": f"Bearer {kit.rw.key}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "old", "version": "1"},
        },
    }
    with httpx.Client(base_url=http_server.base, headers=headers, timeout=10) as h:
        r = h.post("/mcp", json=init)
        assert r.status_code == 200, r.text
        body = _json_of(r)
        assert body["result"]["protocolVersion"] == "2025-06-18"
        session = r.headers.get("mcp-session-id")
        more = {"mcp-protocol-version": "2025-06-18"} | ({"mcp-session-id": session} if session else {})
        h.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=more)
        listed = h.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=more)
        assert listed.status_code == 200, listed.text
        names = {t["name"] for t in _json_of(listed)["result"]["tools"]}
        assert "create_webhook" in names


def _json_of(r: httpx.Response) -> dict:
    import json

    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return r.json()


def test_two_servers_behind_a_round_robin_proxy_answer_one_stateless_client(
    db_url: str, tmp_path, kit: TeamKit
):
    """2026-07-28 is stateless: every request stands alone, so any process can answer it."""
    import itertools
    from collections import Counter

    from tests.conftest import child_env, free_port, spawn_server
    from tests.tcpproxy import TcpProxy

    class RoundRobin(TcpProxy):
        def __init__(self, port: int, targets: list[tuple[str, int]]) -> None:
            self._cycle = itertools.cycle(targets)
            self.hits: Counter[tuple[str, int]] = Counter()
            super().__init__(port, targets[0])

        @property  # type: ignore[override]
        def target(self) -> tuple[str, int]:
            chosen = next(self._cycle)
            self.hits[chosen] += 1
            return chosen

        @target.setter
        def target(self, value: tuple[str, int]) -> None:
            pass

    env = child_env(db_url)
    with (
        spawn_server(env, tmp_path / "a.log", "--no-dispatcher") as a,
        spawn_server(env, tmp_path / "b.log", "--no-dispatcher") as b,
    ):
        backends = [("127.0.0.1", int(s.base.rsplit(":", 1)[1])) for s in (a, b)]
        port = free_port()
        proxy = RoundRobin(port, backends)
        proxy.start()
        try:

            async def scenario() -> list[int]:
                # A connection per request, so the proxy deals requests out in turn.
                hc = httpx2.AsyncClient(
                    headers={"Authorization": f"Bearer {kit.rw.key}"},
                    timeout=30,
                    limits=httpx2.Limits(max_keepalive_connections=0),
                )
                transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=hc)
                async with Client(transport, mode="2026-07-28") as c:
                    made = []
                    for n in range(4):
                        result = await c.call_tool(
                            "create_webhook",
                            {"url": "https://93.184.216.34/rr", "events": ["scan"], "description": f"rr {n}"},
                        )
                        assert result.is_error is False, result.content
                        made.append(result.structured_content["id"])
                    listed = await c.call_tool("list_webhooks", {"limit": 100})
                    assert {w["id"] for w in listed.structured_content["webhooks"]} >= set(made)
                    return made

            made = anyio.run(scenario)
        finally:
            proxy.stop()
    assert len(made) == 4
    assert all(proxy.hits[t] >= 2 for t in backends), proxy.hits  # both processes answered
