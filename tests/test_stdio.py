"""A real `justscan-mcp serve` subprocess driven over stdio by the SDK's stdio client."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any

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


# --- the wire: pipes on the event loop, anything else through the SDK's threads ------------------


class RawStdio:
    """A `serve` process spoken to line by line, the way an MCP client does on stdio, with stdin
    a pipe or (served by the SDK's threads) a socket. `lines()` starts reading its stdout."""

    def __init__(self, env: dict[str, str], stdin_kind: str) -> None:
        self._socket, theirs = socket.socketpair() if stdin_kind == "socket" else (None, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "justscan_mcp", "serve"],
            env=env,
            stdin=theirs.fileno() if theirs is not None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if theirs is not None:
            theirs.close()
        self._lines: queue.Queue[bytes] | None = None

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        if self._socket is not None:
            self._socket.sendall(data)
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def initialize(self) -> None:
        info = {"name": "raw", "version": "1"}
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": info}
        self.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline())["result"]["serverInfo"]["name"] == "justscan-webhooks"
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def close_input(self) -> None:
        if self._socket is not None:
            self._socket.shutdown(socket.SHUT_WR)
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def answer(self, request_id: int, timeout: float = 30) -> dict[str, Any]:
        if self._lines is None:
            lines: queue.Queue[bytes] = queue.Queue()
            assert self.proc.stdout is not None
            out = self.proc.stdout
            threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True).start()
            self._lines = lines
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no answer to request {request_id} within {timeout} s")
            message = json.loads(line)  # every line on the wire is one whole JSON-RPC message
            if message.get("id") == request_id:
                return message

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """The exit code (killed if still running after `timeout`) and everything on stderr."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self._socket is not None:
                self._socket.close()
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read().decode()


def _call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


@pytest.mark.parametrize("stdin_kind", ["pipe", "socket"])
def test_the_stdio_wire_on_pipes_and_on_a_socket(db_url: str, kit: TeamKit, stdin_kind: str):
    """Pipes (how MCP clients launch a server) are read and written by the event loop; anything
    else, here a socket as stdin, is served by the SDK's threads. Either way: a request line of
    300 KB is read whole and answered, the session goes on after it, every line out is one whole
    message, and closing stdin ends the process cleanly."""
    wire = RawStdio(child_env(db_url, JUSTSCAN_API_KEY=kit.rw.key, JUSTSCAN_LOG_LEVEL="info"), stdin_kind)
    try:
        wire.initialize()
        huge = "d" * 300_000
        wire.send(_call(2, "create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "description": huge}))
        refused = wire.answer(2)["result"]
        assert refused["isError"] is True and "description" in refused["content"][0]["text"]
        wire.send(_call(3, "create_webhook", {"url": PUBLIC_URL, "events": ["scan"], "description": "é"}))
        made = wire.answer(3)["result"]["structuredContent"]
        assert made["description"] == "é"
        wire.send(_call(4, "list_webhooks", {}))
        assert [w["id"] for w in wire.answer(4)["result"]["structuredContent"]["webhooks"]] == [made["id"]]
        wire.close_input()
    finally:
        code, log = wire.finish()
    assert code == 0, log
    served_by = (
        "pipes read and written on the event loop" if stdin_kind == "pipe" else "reader and writer threads"
    )
    assert served_by in log, log
    assert "Traceback" not in log, log
    assert kit.webhook_count() == 1


PIPE_HARNESS = """
import asyncio, os, subprocess, sys
from justscan_mcp.stdio_pipes import pipe_stdio

async def main():
    async with pipe_stdio() as pipes:
        lines, out = pipes
        async for line in lines:
            print("stray print")
            sys.stdout.flush()
            subprocess.run(["echo", "stray child"], check=True)
            os.write(1, b"stray write\\n")
            assert sys.stdin.read() == ""
            await out.write(f"{len(line)} {line.rstrip()[-12:]}\\n")
            await out.flush()
    os.write(1, b"after\\n")
    assert os.get_blocking(0) and os.get_blocking(1)

asyncio.run(main())
"""


def test_the_pipe_wire_is_claimed_while_serving_and_given_back_after():
    """While serving, fd 1 goes to stderr and fd 0 reads nothing, so a stray print, a child's
    output or a direct write cannot tear a frame, and nobody else reads the client's requests.
    A line of 1 MB arrives whole, with no character split between two reads mangled, bad bytes
    become U+FFFD, a last line without a newline is read; after serving, fd 0 and fd 1 are the wire again,
    blocking as before."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPE_HARNESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    # 1 MB of two-byte characters from an odd offset, read in pieces of 64 KiB or less: some
    # pieces end inside a character.
    proc.stdin.write(b"first!\n" + "é".encode() * 500_000 + b"\n" + b"bad \xff\n" + b"last")
    proc.stdin.close()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err.decode()
    assert out.decode().splitlines() == [
        "7 first!",
        f"500001 {'é' * 12}",
        "6 bad \ufffd",
        "4 last",
        "after",
    ]
    assert err.decode().count("stray print") == 4
    assert err.decode().count("stray child") == 4
    assert err.decode().count("stray write") == 4


def test_on_windows_the_sdk_keeps_the_wire(monkeypatch):
    """Windows' event loop has no pipe transports for fd 0 and fd 1 (and no fcntl): the module
    must still import there, and hand the wire back to the SDK untouched."""
    import anyio

    from justscan_mcp import stdio_pipes

    monkeypatch.setattr(stdio_pipes, "_is_pipe", lambda fd: True)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` fails, as it does on Windows

    async def served() -> object:
        async with stdio_pipes.pipe_stdio() as pipes:
            return pipes

    assert anyio.run(served) is None


@pytest.mark.parametrize("stdin_kind", ["pipe", "socket"])
def test_a_client_that_stops_reading_ends_the_server_with_one_line(
    db_url: str, kit: TeamKit, stdin_kind: str
):
    """A client that crashes or closes our stdout while calls are under way: the server must not
    linger (with the dispatcher it would keep sending for a client that is gone) nor end in a
    traceback in the desktop client's log. It says so in one line and exits normally."""
    wire = RawStdio(child_env(db_url, JUSTSCAN_API_KEY=kit.rw.key), stdin_kind)
    try:
        wire.initialize()
        assert wire.proc.stdout is not None
        wire.proc.stdout.close()  # the client stops reading; stdin stays open
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may be gone already
            for i in range(20):
                wire.send(_call(10 + i, "list_webhooks", {"limit": 100}))
    finally:
        code, log = wire.finish()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "the client stopped reading our answers" in log
