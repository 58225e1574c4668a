"""A real `justscan-mcp serve` subprocess driven over stdio by the SDK's stdio client."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mcp import Client, MCPError, StdioServerParameters

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from tests.conftest import ALL_TOOLS, PUBLIC_URL, READ_TOOLS, TeamKit, child_env, make_team

pytestmark = pytest.mark.anyio


def params(db_url: str, key: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "justscan_mcp", "serve"],
        env=child_env(db_url, JUSTSCAN_API_KEY=key),
    )


def start_refused(db_url: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = child_env(db_url) | ({"JUSTSCAN_API_KEY": key} if key is not None else {})
    return subprocess.run(
        [sys.executable, "-m", "justscan_mcp", "serve", "--transport", "stdio"],
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_to_start_with_a_one_line_reason(db_url: str, app):
    kit = make_team(app, "stdio-refuse")
    revoked, disabled = kit.key(), kit.key(mcp_enabled=False)
    app.service.revoke_api_key(key_id=revoked.id)
    cases = {
        None: "JUSTSCAN_API_KEY is not set",
        "jsi_" + "u" * 43: "unknown API key",
        revoked.key: "revoked",
        disabled.key: "MCP is not enabled",
    }
    for key, reason in cases.items():
        proc = start_refused(db_url, key)
        assert proc.returncode != 0
        assert proc.stdout == ""  # stdout is the protocol channel
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], proc.stderr
        if key:
            assert key not in proc.stderr  # the key itself is never echoed


async def test_tools_over_stdio_with_isolation_and_live_revocation(db_url: str, app):
    a, b = make_team(app, "stdio-a"), make_team(app, "stdio-b")
    theirs = b.app.service.create_webhook(principal=b.principal(), url=PUBLIC_URL, events=["scan"])
    key = a.key()
    async with Client(params(db_url, key.key)) as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == ALL_TOOLS
        made = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["first_scan"]})
        assert made.is_error is False and made.structured_content["team_id"] == a.team.id
        listed = (await c.call_tool("list_webhooks", {})).structured_content["webhooks"]
        assert [w["id"] for w in listed] == [made.structured_content["id"]]
        foreign = await c.call_tool("delete_webhook", {"webhook_id": theirs.id})
        assert foreign.is_error and "does not exist" in foreign.content[0].text
        bad = await c.call_tool("create_webhook", {"url": "https://10.0.0.1/x", "events": ["scan"]})
        assert bad.is_error and "url" in bad.content[0].text
        app.service.revoke_api_key(key_id=key.id)  # from another process, while the server runs
        with pytest.raises(MCPError, match="revoked"):
            await c.call_tool("list_webhooks", {})
    assert b.webhook_count() == 1 and a.webhook_count() == 1


async def test_read_only_key_over_stdio(db_url: str, kit: TeamKit):
    ro = kit.key(scopes=["webhooks:read"])
    async with Client(params(db_url, ro.key)) as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == READ_TOOLS
        refused = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})
        assert refused.is_error and "webhooks:write" in refused.content[0].text
    assert kit.webhook_count() == 0


def test_a_sqlite_start_does_not_import_the_postgresql_dialect(tmp_path):
    """Naming a `postgresql_*` argument in a model imports SQLAlchemy's PostgreSQL dialect with
    every driver module (20-40 ms of each stdio start and CLI command). On a current SQLite
    database, the work the stdio server does before its first reply leaves it unimported. Fresh
    interpreter, as a cold start is; the database is made beforehand, as a user's is (a first
    migration loads Alembic, and Alembic loads every dialect)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    app = App.build(Settings(database_url=url))
    app.prepare()
    key = make_team(app).rw
    app.close()
    script = f"""
import sys
from justscan_mcp.app import App
from justscan_mcp.config import Settings
app = App.build(Settings(database_url="{url}"))
app.prepare()
app.service.require_mcp(app.service.authenticate("{key.key}"))
loaded = sorted(m for m in sys.modules if m.startswith("sqlalchemy.dialects.postgresql"))
assert not loaded, loaded
app.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_building_the_mcp_server_leaves_logging_alone_and_rich_unimported(tmp_path):
    """The SDK's MCPServer() configures the root logger with rich's handler, importing rich for
    it (12-13 ms of a stdio cold start). Ours is built without that step: the process's logging is
    the CLI's, and a program that builds the server keeps its own. Run in a fresh interpreter, as
    a cold start is."""
    script = f"""
import logging, sys
from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.mcp_server import build_mcp_server
app = App.build(Settings(database_url="sqlite:///{tmp_path / "b.db"}"))
app.prepare()
before = list(logging.getLogger().handlers)
build_mcp_server(app)
assert logging.getLogger().handlers == before, logging.getLogger().handlers
assert "rich" not in sys.modules, "rich was imported"
app.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


COLLECTOR_PROBE = """
import gc, sys, threading, time
default = gc.get_threshold()
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "justscan_mcp.cli":
            seen.setdefault("cli", gc.get_threshold())
        return None
sys.meta_path.insert(0, Probe())
def watch():
    deadline = time.monotonic() + 30
    while not (gc.get_freeze_count() and gc.get_threshold() == default) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("probe", repr((seen.get("cli"), gc.get_threshold(), default)), file=sys.stderr, flush=True)
threading.Thread(target=watch, daemon=True).start()
"""


@pytest.mark.parametrize("entry", ["python -m", "script"])
def test_a_start_runs_its_imports_under_a_relaxed_collector_and_ends_on_the_defaults(
    db_url, app, tmp_path, entry
):
    """The collector's default thresholds cost 134-181 ms of a start (most of it walking the heap
    that the imports build). Both entries (`python -m justscan_mcp`, the `justscan-mcp` script)
    relax it before the command line's imports, and the started server is back on the
    interpreter's thresholds. Observed from inside a real stdio server by a `sitecustomize`
    probe: the thresholds when `justscan_mcp.cli` is first looked up, and the thresholds once
    the lifespan has frozen the start's objects (or what they are after 30 s)."""
    import ast
    import shutil
    from pathlib import Path

    from justscan_mcp.collector import START_THRESHOLD

    (tmp_path / "sitecustomize.py").write_text(COLLECTOR_PROBE)
    key = make_team(app, "stdio-gc").rw
    env = child_env(db_url, JUSTSCAN_API_KEY=key.key, PYTHONPATH=str(tmp_path))
    script = shutil.which("justscan-mcp", path=str(Path(sys.executable).parent))
    assert script, "the justscan-mcp script is not installed beside this interpreter"
    command = [sys.executable, "-m", "justscan_mcp", "serve"] if entry == "python -m" else [script, "serve"]
    proc = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(
            '{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": '
            '"2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}\n'
        )
        proc.stdin.flush()
        assert '"result"' in proc.stdout.readline()
        line = proc.stderr.readline()  # the probe's line; the server logs nothing below warning
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert line.startswith("probe "), line
    at_cli, after, default = ast.literal_eval(line.removeprefix("probe "))
    assert at_cli == (START_THRESHOLD, *default[1:]), f"the command line was imported at {at_cli}"
    assert after == default


def test_importing_the_package_leaves_the_collector_alone():
    """Programs and tests that import the service (not run its entry) keep their thresholds."""
    script = """
import gc
before = gc.get_threshold()
import justscan_mcp, justscan_mcp.cli, justscan_mcp.app, justscan_mcp.mcp_server
assert gc.get_threshold() == before, gc.get_threshold()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
