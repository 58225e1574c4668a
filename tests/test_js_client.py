"""The official MCP TypeScript SDK client (`@modelcontextprotocol/sdk` from npm) drives a real
server over stdio and over streamable HTTP with a bearer key: list tools, create, list, delete,
an invalid argument, and the refusal for a missing scope (tests/js/mcp_client.mjs)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import (
    ALL_TOOLS,
    PUBLIC_URL,
    READ_TOOLS,
    HttpServer,
    TeamKit,
    child_env,
    js_packages,
    program,
)


def run_client(mode: str, env: dict[str, str]) -> dict:
    js = js_packages()
    node = program("node", "install Node.js 18 or newer")
    proc = subprocess.run(
        [node, str(js / "mcp_client.mjs"), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(seen: dict, kit: TeamKit) -> None:
    assert seen["server"]["name"] == "justscan-webhooks"
    assert seen["tools"] == ALL_TOOLS
    made = seen["created"]
    assert made["isError"] is False and made["webhook"]["team_id"] == kit.team.id
    assert made["webhook"]["secret"].startswith("whsec_")
    assert seen["listed"] == [made["webhook"]["id"]]
    recovered = seen["recovered"]
    assert recovered["isError"] is False and recovered["result"]["dry_run"] is True
    assert (recovered["result"]["count"], recovered["result"]["more"]) == (0, False)
    stats = seen["stats"]
    assert (
        stats["isError"] is False and stats["result"]["hours"] == 48 and len(stats["result"]["hourly"]) == 48
    )
    assert stats["result"]["deliveries"] == {"pending": 0, "retrying": 0, "succeeded": 0, "failed": 0}
    assert stats["result"]["success_rate"] is None
    assert seen["deleted"] == {"deleted": True, "webhook_id": made["webhook"]["id"]}
    assert seen["listedAfterDelete"] == []
    assert seen["invalid"]["isError"] is True and "url" in seen["invalid"]["text"]
    assert seen["readOnlyTools"] == READ_TOOLS
    refused = seen["missingScope"]
    assert refused["isError"] is True and "webhooks:write" in refused["text"]
    assert kit.webhook_count() == 0


def test_typescript_sdk_client_over_stdio(db_url: str, kit: TeamKit):
    ro = kit.key(scopes=["webhooks:read"])
    env = child_env(
        db_url,
        JS_PYTHON=sys.executable,
        JS_DB_URL=db_url,
        JS_WRITE_KEY=kit.rw.key,
        JS_READ_KEY=ro.key,
        JS_TARGET_URL=PUBLIC_URL,
    )
    check(run_client("stdio", env), kit)


def test_typescript_sdk_client_over_streamable_http(http_server: HttpServer, db_url: str, kit: TeamKit):
    ro = kit.key(scopes=["webhooks:read"])
    env = child_env(
        db_url,
        JS_MCP_URL=f"{http_server.base}/mcp",
        JS_WRITE_KEY=kit.rw.key,
        JS_READ_KEY=ro.key,
        JS_TARGET_URL=PUBLIC_URL,
    )
    check(run_client("http", env), kit)
