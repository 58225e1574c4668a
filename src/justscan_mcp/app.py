"""Wiring: one `App` per process, and the one lifespan every front end shares.

`App` builds the store and service from `Settings` without touching the database; `lifespan()`
waits for the database (retrying with backoff instead of exiting, as SPEC asks of servers) and
creates the schema. The MCP server, the HTTP app and the CLI all get their state from here.

Why not MCPServer's own `lifespan=`: the SDK enters that once per MCP session, and process-wide
resources (the engine, later the dispatcher) must exist once per process.
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from justscan_mcp import collector
from justscan_mcp.config import Settings
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.service import Service
from justscan_mcp.store import Store, redact_url
from justscan_mcp.targets import Resolver, system_resolver
from justscan_mcp.threads import in_thread

log = logging.getLogger("justscan_mcp")


@dataclass
class App:
    settings: Settings
    store: Store
    service: Service
    _ready: anyio.Event = field(default_factory=anyio.Event, init=False, repr=False)
    # This process's dispatcher while it runs (a `dispatcher.Dispatcher`; typed loosely so the
    # wiring need not import the engine before it is wanted).
    dispatcher: Any = field(default=None, init=False, repr=False)
    _metrics: Any = field(default=None, init=False, repr=False)
    _runs_dispatcher: bool = field(default=False, init=False, repr=False)

    @classmethod
    def build(cls, settings: Settings, *, resolver: Resolver = system_resolver) -> App:
        store = Store.from_url(settings.database_url)
        return cls(settings=settings, store=store, service=Service(store, settings, resolver=resolver))

    @property
    def metrics(self) -> Any:
        """This process's `metrics.Metrics`, made on first use (prometheus_client costs ~75 ms to
        import, which short CLI commands do not pay), with the database gauges attached."""
        if self._metrics is None:
            from justscan_mcp.metrics import Metrics

            self._metrics = Metrics()
            self._metrics.watch_database(self.service.operations_status)
        return self._metrics

    def prepare(self) -> None:
        """Create the schema now (CLI commands, tests). Raises: StoreUnavailable."""
        self.store.create_schema()

    async def wait_until_ready(self, *, max_delay: float = 30.0) -> None:
        """Wait until the database answers and has its schema, backing off and logging each retry
        (never the password). Cancellable between tries, so a stop signal ends the wait."""
        delay = 0.5
        while True:
            try:
                await in_thread(self.store.create_schema)
                return
            except StoreUnavailable as exc:
                log.warning(
                    "database %s not reachable (%s); retrying in %.1fs",
                    redact_url(self.settings.database_url),
                    exc.message.splitlines()[0],
                    delay,
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay)

    def close(self) -> None:
        self.store.close()

    async def unready_reason(self) -> str | None:
        """Why this process should not get traffic, or None: the database does not answer, its
        schema is not the one this code needs, or (where a dispatcher runs here) the claim loop
        has not turned for three poll intervals."""
        if not self.ready:
            return "starting: the database has not answered yet"
        try:
            current = await in_thread(self.store.schema_is_current)
        except StoreUnavailable:
            return "the database does not answer"
        if not current:
            return "the database schema is not at this version's head (run `justscan-mcp db upgrade`)"
        running = self.dispatcher
        if self._runs_dispatcher and running is None:
            return "starting: the dispatcher is not running yet"
        if running is not None:
            stalled = running.stalled_for()
            if stalled is not None:
                return f"the dispatcher's claim loop has not turned for {stalled:.1f}s"
        return None

    @property
    def ready(self) -> bool:
        """True once the database has answered and has its schema."""
        return self._ready.is_set()

    @asynccontextmanager
    async def lifespan(self, *, dispatcher: bool = False) -> AsyncIterator[App]:
        """Process-wide start and stop, shared by stdio, HTTP and workers.

        The database is awaited in the background: the process starts serving at once (health
        and requests answer 503 until the database is there) and a stop signal is never stuck
        behind a database that does not answer.
        """

        running: Any = None
        self._runs_dispatcher = dispatcher

        async def become_ready() -> None:
            nonlocal running
            await self.wait_until_ready()
            self._ready.set()
            if dispatcher:
                # Imported in a thread: the sender and APScheduler take a while to import, and on the
                # event loop that would delay the MCP client's initialize reply.
                module = await in_thread(importlib.import_module, "justscan_mcp.dispatcher")
                dispatcher_ = module.Dispatcher(self.store, self.settings, metrics=self.metrics)
                # Known to the stop path before start() runs: a stop signal during start-up
                # then stops what was started (Dispatcher.stop tolerates a partial start).
                running = dispatcher_
                self.dispatcher = dispatcher_
                await dispatcher_.start()
                self.service.on_recorded = dispatcher_.wake
                # A test delivery's caller is told when its attempt is saved here (no polling).
                dispatcher_.on_saved = self.service.test_signals.saved
                self.service.test_signals.local_dispatcher = True
            # What exists now (modules, schemas, the engine, the dispatcher) lives as long as the
            # process: out of the cyclic collector's sight, so its full collections stop walking
            # it again and again. Under load they did, every few thousand allocations: a batch of
            # 1,000 events took 30.5 ms in-process with them and 21.9 ms after gc.freeze()
            # (bench/run.py's ingest and throughput rows moved with it). Not collected first: after
            # a start under `collector`'s relaxed threshold, a collection here found 51 unreachable
            # objects and took 52 ms on the event loop, just as the client's first calls arrive.
            gc.freeze()
            collector.started()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(become_ready)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
            self._runs_dispatcher = False
            if running is not None:
                self.dispatcher = None
                self.service.on_recorded = lambda: None
                self.service.test_signals.local_dispatcher = False
                await running.stop()
        finally:
            self.close()
