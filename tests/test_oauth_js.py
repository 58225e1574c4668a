"""The official MCP TypeScript SDK client completes the OAuth flow against a real
`serve --transport http`: discovery, registration, consent, token, tool calls, refresh, and a
revoked key seen on the next call (tests/js/mcp_oauth_client.mjs)."""

from __future__ import annotations

import json
import subprocess

import httpx

from tests.conftest import PUBLIC_URL, HttpServer, TeamKit, js_packages, program


def test_the_typescript_sdk_client_connects_through_oauth(http_server: HttpServer, kit: TeamKit):
    js = js_packages()
    key = kit.key()
    proc = subprocess.run(
        [program("node", "install Node.js 18 or newer"), str(js / "mcp_oauth_client.mjs")],
        env={
            "PATH": "/usr/bin:/bin",
            "JS_BASE_URL": http_server.base,
            "JS_API_KEY": key.key,
            "JS_TARGET_URL": PUBLIC_URL,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["iss"] == http_server.base
    assert "create_webhook" in seen["tools"] and "get_webhook_stats" in seen["tools"]
    assert seen["created"]["team_id"] == kit.team.id and seen["created"]["description"] == "via OAuth from TS"
    assert seen["refreshStatus"] == 200 and seen["rotated"] is True and seen["afterRefresh"] == 1
    (app,) = kit.app.service.connected_apps(team_id=kit.team.id)
    assert app["client_name"] == "TS SDK assistant" and app["key_id"] == key.id
    # Revoking the key that approved ends the app's access on its next call.
    kit.app.service.revoke_api_key(key_id=key.id)
    r = httpx.post(
        f"{http_server.base}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={
            "Authorization": f"Bearer {seen['access']}",
            "Accept": "application/json, text/event-stream",
        },
        timeout=10,
    )
    assert r.status_code == 401 and "resource_metadata=" in r.headers["www-authenticate"]
