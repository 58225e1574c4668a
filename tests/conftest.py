"""Shared fixtures.

Store-backed tests run twice: on a real SQLite file and on the real PostgreSQL named by
`JUSTSCAN_TEST_DATABASE_URL` (a fresh database is created for the session and dropped after).
Without that variable the PostgreSQL half is skipped, except under CI=true, where it is an error.
Tests never share teams: each makes its own with a unique name, so one database serves a module.
"""

from __future__ import annotations

import compileall
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.models import ApiKeyCreated, Principal, TeamPublic
from justscan_mcp.store import Store, normalise_url


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package once. The suite starts a few hundred `justscan-mcp` processes;
    with PYTHONDONTWRITEBYTECODE=1 (set on CI's machine kind) an editable install never keeps
    a .pyc, and each of them compiled our modules from source again (~0.2 s a CLI call)."""
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "src" / "justscan_mcp", quiet=1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A `serial` test stops the shared PostgreSQL or bounds a time that a second busy process
    stretches (a rate over a window, a latency under a timeout). Beside another xdist process it
    would fail the other process's tests, or fail at random itself: under -n it fails at once
    with that reason instead (a skip would go unnoticed). The README's command runs these after
    the rest, in a pytest of their own."""
    if os.environ.get("PYTEST_XDIST_WORKER") and item.get_closest_marker("serial"):
        pytest.fail(
            "a `serial` test cannot run beside another process (-n): run -m 'not serial' under -n, "
            "then -m serial alone, as the README's test command does",
            pytrace=False,
        )


READ_TOOLS = ["get_webhook", "get_webhook_stats", "list_deliveries", "list_webhooks"]
WRITE_TOOLS = [
    "create_webhook",
    "delete_webhook",
    "recover_deliveries",
    "redeliver",
    "rotate_secret",
    "test_webhook",
    "update_webhook",
]
ALL_TOOLS = sorted(READ_TOOLS + WRITE_TOOLS)
PUBLIC_IP = "93.184.216.34"
PUBLIC_URL = f"https://{PUBLIC_IP}/hooks/justscan"

# Names the stub resolver knows; every other name does not resolve (as in this offline sandbox).
STUB_DNS: dict[str, list[str]] = {
    "hooks.example.test": [PUBLIC_IP, "2606:2800:220:1:248:1893:25c8:1946"],
    "internal.example.test": ["10.0.0.5"],
    "rebind.example.test": [PUBLIC_IP, "127.0.0.1"],
    "metadata.example.test": ["169.254.169.254"],
}


def stub_resolver(host: str, port: int) -> list[str]:
    try:
        return STUB_DNS[host]
    except KeyError:
        raise OSError(f"{host} does not resolve") from None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, remedy: str) -> NoReturn:
    """Something a test needs is not here: a failure under CI=true (CI must run every test), a
    skip elsewhere."""
    message = f"{what} is missing: {remedy}"
    if in_ci():
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def program(name: str, remedy: str) -> str:
    """The path of a program on PATH, or `missing`."""
    return shutil.which(name) or missing(name, remedy)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str | None]:
    url = os.environ.get("JUSTSCAN_TEST_DATABASE_URL", "").strip()
    if not url:
        yield None
        return
    admin = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"justscan_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"JUSTSCAN_TEST_DATABASE_URL is set but PostgreSQL is unusable: {exc}")
    try:
        yield make_url(normalise_url(url)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def own_pg_database(base: str, prefix: str = "justscan_own") -> Iterator[str]:
    """A PostgreSQL database of its own, migrated, dropped after: for tests whose rows would
    crowd the shared test database (thousands of deliveries other modules' dispatchers would
    then work through) or that count across every team. The drop survives a PostgreSQL restart
    inside the block (pre-ping replaces the pooled connection the restart killed)."""
    admin = create_engine(normalise_url(base), isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(base)).set(database=name).render_as_string(hide_password=False)
    try:
        store = Store.from_url(url)
        store.migrate()
        store.close()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def own_database(request: pytest.FixtureRequest, kind: str, folder: Path, prefix: str) -> Iterator[str]:
    """A migrated database of its own: a SQLite file in `folder`, or (kind "postgres") a
    PostgreSQL database next to the shared one (`own_pg_database`)."""
    if kind == "sqlite":
        url = f"sqlite:///{folder / f'{prefix}.db'}"
        Store.from_url(url).migrate()
        yield url
        return
    base = request.getfixturevalue("pg_base_url")
    if base is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "set it to run the PostgreSQL half")
    with own_pg_database(base, prefix) as url:
        yield url


@pytest.fixture(scope="module")
def pg_url(pg_base_url: str | None) -> str:
    """PostgreSQL only, migrated: for tests of what only a network database has (scale-out,
    restarts, LISTEN/NOTIFY)."""
    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")
    store = Store.from_url(pg_base_url)
    store.migrate()
    store.close()
    return pg_base_url


def _db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'justscan.db'}"
    base = request.getfixturevalue("pg_base_url")
    if base is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "set it to run the PostgreSQL half")
    return str(base)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = _db_url(request, tmp_path_factory)
    # What an operator does once per release (`justscan-mcp db upgrade`); SQLite would do it itself.
    store = Store.from_url(url)
    store.migrate()
    store.close()
    return url


@pytest.fixture(scope="module")
def app(db_url: str) -> Iterator[App]:
    application = App.build(Settings(database_url=db_url), resolver=stub_resolver)
    application.prepare()
    yield application
    application.close()


@dataclass
class TeamKit:
    """A team of its own for one test, with a read-write key and helpers."""

    app: App
    team: TeamPublic
    rw: ApiKeyCreated

    def key(self, **kwargs: Any) -> ApiKeyCreated:
        return self.app.service.create_api_key(team_id=self.team.id, **kwargs)

    def principal(self, key: ApiKeyCreated | None = None) -> Principal:
        return self.app.service.authenticate((key or self.rw).key)

    def webhook_count(self) -> int:
        return len(self.app.store.list_webhooks(team_id=self.team.id, after_id=0, limit=10_000))


def make_team(app: App, prefix: str = "team") -> TeamKit:
    team = app.service.create_team(name=f"{prefix}-{uuid.uuid4().hex[:10]}")
    return TeamKit(app=app, team=team, rw=app.service.create_api_key(team_id=team.id))


@pytest.fixture
def kit(app: App) -> TeamKit:
    return make_team(app, "a")


@pytest.fixture
def other(app: App) -> TeamKit:
    return make_team(app, "b")


# --- real processes ---------------------------------------------------------------------------


# The readiness probe's client, shared: `httpx.get` builds a client and its SSL context per call
# (~30 ms of CPU here), and a poll every 50 ms of a starting server took that CPU from it.
# `Connection: close`: the probe leaves no idle connection behind in the server under test.
PROBE = httpx.Client(timeout=1, headers={"Connection": "close"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `predicate` until it returns a truthy value, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # the condition may raise until it holds (e.g. connection refused)
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


def child_env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUSTSCAN_")}
    env["JUSTSCAN_DATABASE_URL"] = db_url
    env.update(extra)
    return env


@dataclass
class HttpServer:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def spawn_server(
    env: dict[str, str], log: Path, *args: str, wait_healthy: bool = True
) -> Iterator[HttpServer]:
    """A real `justscan-mcp serve --transport http` on a free port, stopped (SIGTERM) on exit."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "justscan_mcp",
                "serve",
                "--transport",
                "http",
                "--port",
                str(port),
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = HttpServer(base=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        if wait_healthy:
            wait_for(
                lambda: proc.poll() is None and PROBE.get(f"{server.base}/healthz").status_code == 200,
                what=f"HTTP server on {server.base} (log {log})",
            )
        yield server
    finally:
        stop_process(proc)


def spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A real `justscan-mcp worker` process, logging to `log` (appended: a log may span restarts)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "justscan_mcp", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def http_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """The strict server (private targets refused). It runs no dispatcher: it must never send,
    and a second dispatcher with other retry settings on the same database would race the one
    a test configured for its deliveries."""
    log = tmp_path_factory.mktemp("http") / "server.log"
    with spawn_server(child_env(db_url), log, "--no-dispatcher") as server:
        yield server


# --- software from outside the project (npm) --------------------------------------------------

JS_DIR = Path(__file__).parent / "js"


def js_packages() -> Path:
    """tests/js with its npm packages installed (`npm ci --prefix tests/js`, which .ci/run does):
    the official MCP TypeScript SDK, the MCP conformance suite and Node 22 for it."""
    if not (JS_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        missing("tests/js/node_modules", "run `npm ci --prefix tests/js`")
    return JS_DIR
