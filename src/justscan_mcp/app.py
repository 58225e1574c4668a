"""Wiring: one `App` per process, and the one lifespan every front end shares.

`App` builds the store and service from `Settings` without touching the database; `lifespan()`
waits for the database (retrying with backoff instead of exiting, as SPEC asks of servers) and
creates the schema. The MCP server, the HTTP app and the CLI all get their state from here.

Why not MCPServer's own `lifespan=`: the SDK enters that once per MCP session, and process-wide
resources (the engine, later the dispatcher) must exist once per process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio.to_thread

from justscan_mcp.config import Settings
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.service import Service
from justscan_mcp.store import Store, redact_url
from justscan_mcp.targets import Resolver, system_resolver

log = logging.getLogger("justscan_mcp")


@dataclass
class App:
    settings: Settings
    store: Store
    service: Service

    @classmethod
    def build(cls, settings: Settings, *, resolver: Resolver = system_resolver) -> App:
        store = Store.from_url(settings.database_url)
        return cls(settings=settings, store=store, service=Service(store, settings, resolver=resolver))

    def prepare(self) -> None:
        """Create the schema now (CLI commands, tests). Raises: StoreUnavailable."""
        self.store.create_schema()

    def wait_until_ready(self) -> None:
        """Block until the database answers, logging each retry (never the password)."""

        def on_retry(delay: float, exc: StoreUnavailable) -> None:
            log.warning(
                "database %s not reachable (%s); retrying in %.1fs",
                redact_url(self.settings.database_url),
                exc.message.splitlines()[0],
                delay,
            )

        self.store.wait_until_ready(on_retry=on_retry)

    def close(self) -> None:
        self.store.close()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        """Process-wide start and stop, shared by stdio, HTTP and workers."""
        await anyio.to_thread.run_sync(self.wait_until_ready, abandon_on_cancel=True)
        try:
            yield self
        finally:
            self.close()
