"""The dispatcher: claims due deliveries with a lease, sends them, records every attempt.

Shape of one process's dispatcher:
- an APScheduler `AsyncIOScheduler` is the clock: a poll tick (`JUSTSCAN_POLL_INTERVAL`, for work
  recorded by other processes and for expired leases) and a one-shot job at each retry time this
  process scheduled;
- `wake()` (thread-safe) starts a claim at once, which is how an event recorded in this process
  is on its way within milliseconds;
- the pump claims at most as many deliveries as there are free in-flight slots
  (`JUSTSCAN_MAX_IN_FLIGHT`), so the database lease always covers work that is really running;
- `JUSTSCAN_MAX_IN_FLIGHT` long-lived sender coroutines take claimed deliveries from a queue and
  post them (aiohttp; never blocking the MCP server's loop); a task per delivery cost ~20 µs of
  CPU each, a tenth of a delivery's budget. The database calls run in worker threads;
- one writer batches finished attempts into a single transaction.

Leases last the delivery timeout plus a margin, so a process that dies delays its deliveries by
at most that long; then any process claims them again. Delivery is at least once: a process that
dies after a receiver answered but before the attempt was saved leads to one more attempt, with
the same X-Webhook-Delivery / webhook-id, which receivers use to deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from justscan_mcp.config import Settings
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.models import utcnow
from justscan_mcp.retry import after_attempt
from justscan_mcp.sender import Sender, delivery_headers
from justscan_mcp.store import NOTIFY_CHANNEL, AttemptResult, Claimed, Store

log = logging.getLogger("justscan_mcp.dispatcher")

WRITE_BATCH = 500
_T = TypeVar("_T")


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Dispatcher:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        worker_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self.clock = clock
        self.sender = Sender(
            timeout=settings.delivery_timeout,
            allow_private=settings.allow_private_targets,
            max_connections=settings.max_in_flight,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._jobs: asyncio.Queue[Claimed | None] = asyncio.Queue()
        self._open = 0  # claimed by this process and not yet finished
        self._senders: list[asyncio.Task[None]] = []
        # Finished attempts waiting for the writer: a list and an event, cheaper per item than a
        # queue. Two database threads of our own, not the shared pool: a claim and a save run
        # side by side, and no request handler's thread work queues behind them.
        self._results: list[AttemptResult] = []
        self._results_ready = asyncio.Event()
        self._closing = False
        self._db = ThreadPoolExecutor(max_workers=2, thread_name_prefix="justscan-db")
        self._tasks: list[asyncio.Task[None]] = []
        self._backlog = False
        self._scheduler: Any = None
        self._listener: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._loop = asyncio.get_running_loop()
        await self.sender.start()
        scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=UTC)
        scheduler.add_job(
            self._tick,
            "interval",
            seconds=self.settings.poll_interval,
            id="poll",
            coalesce=True,
            max_instances=1,
        )
        scheduler.start()
        self._scheduler = scheduler
        self._senders = [
            asyncio.create_task(self._send_loop(), name=f"justscan-sender-{i}")
            for i in range(self.settings.max_in_flight)
        ]
        self._tasks = [
            asyncio.create_task(self._pump(), name="justscan-pump"),
            asyncio.create_task(self._writer(), name="justscan-writer"),
        ]
        dsn = self.store.listen_dsn()
        self._listener = asyncio.create_task(self._listen(dsn), name="justscan-listen") if dsn else None
        log.info("dispatcher %s started (max %d in flight)", self.worker_id, self.settings.max_in_flight)
        self.wake()

    async def stop(self) -> None:
        """Graceful stop: claim nothing more, let in-flight sends finish (each is bounded by the
        delivery timeout), save their attempts, then close."""
        self._stopping = True
        self._wake.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        pump, writer = self._tasks
        await pump
        if self._open:
            log.info("dispatcher %s: waiting for %d in-flight sends", self.worker_id, self._open)
        for _ in self._senders:
            self._jobs.put_nowait(None)  # after every queued job: the queue is first in, first out
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._closing = True
        self._results_ready.set()
        await writer
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        await self.sender.close()
        self._db.shutdown(wait=False)
        log.info("dispatcher %s stopped", self.worker_id)

    def wake(self) -> None:
        """Look for due work now. Safe to call from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def _listen(self, dsn: str) -> None:
        """LISTEN for work recorded by other processes (PostgreSQL), reconnecting by itself; the
        poll tick covers the moments without a listening connection."""
        import psycopg

        delay = 0.5
        while not self._stopping:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if delay > 0.5:
                        log.info("listening for new work again")
                    delay = 0.5
                    self._wake.set()  # anything recorded while we were not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "LISTEN connection lost (%s); reconnecting in %.1fs", str(exc).splitlines()[0], delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _tick(self) -> None:
        self._wake.set()

    def _wake_at(self, when: datetime) -> None:
        if self._scheduler is not None and not self._stopping:
            self._scheduler.add_job(self._tick, "date", run_date=when, misfire_grace_time=None)

    # --- the pump ---------------------------------------------------------------------------

    async def _pump(self) -> None:
        delay = 0.5
        while not self._stopping:
            self._wake.clear()
            free = self.settings.max_in_flight - self._open
            if free > 0:
                now = self.clock()
                until = now + timedelta(seconds=self.settings.lease_seconds)
                try:
                    claimed = await self._in_thread(
                        partial(
                            self.store.claim_due,
                            worker=self.worker_id,
                            now=now,
                            lease_until=until,
                            limit=free,
                        )
                    )
                    delay = 0.5
                except StoreUnavailable as exc:
                    log.warning("claim failed (%s); retrying in %.1fs", exc.message.splitlines()[0], delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                except Exception:
                    # A bug, not an outage: say so loudly, but keep the pump alive (a dead pump
                    # would stop every delivery of this process without a word).
                    log.exception("claim failed unexpectedly; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self._open += len(claimed)
                for job in claimed:
                    self._jobs.put_nowait(job)
                self._backlog = len(claimed) == free
                if self._backlog:
                    continue
            await self._wake.wait()

    async def _send_loop(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                await self._deliver(job)
            except Exception:
                # Not a receiver's behaviour (those come back as data): a bug. The lease expires
                # and the delivery is attempted again; the sender goes on with the next one.
                log.exception("delivery %s: unexpected error while sending", job.delivery_id)
            finally:
                self._open -= 1
                self._done()

    def _done(self) -> None:
        # Under a backlog, claim again once a quarter of the slots are free: one claim of 16 rows
        # costs about what one of 1 row does, so trickling claims would cap the send rate.
        free = self.settings.max_in_flight - self._open
        if (
            self._backlog
            and not self._stopping
            and (free >= max(1, self.settings.max_in_flight // 4) or not self._open)
        ):
            self._wake.set()

    async def _deliver(self, job: Claimed) -> None:
        started = self.clock()
        stamp = int(time.time())
        headers = delivery_headers(
            secrets=list(job.secrets),
            delivery_id=job.delivery_id,
            event=job.event,
            body=job.payload,
            timestamp=stamp,
        )
        outcome = await self.sender.post(job.url, job.payload, headers)
        state = after_attempt(
            attempt_number=job.attempt_number,
            succeeded=outcome.succeeded,
            schedule=self.settings.retry_schedule,
            now=self.clock(),
            single_attempt=job.is_test,
        )
        self._results.append(
            AttemptResult(
                delivery_id=job.delivery_id,
                number=job.attempt_number,
                started_at=started,
                duration_ms=outcome.duration_ms,
                status_code=outcome.status_code,
                response_body=outcome.response_body,
                error=outcome.error,
                state=state.state,
                next_attempt_at=state.next_attempt_at,
            )
        )
        self._results_ready.set()

    # --- the writer -------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            while self._results:
                batch = self._results[:WRITE_BATCH]
                del self._results[:WRITE_BATCH]
                await self._save(batch)
            if self._closing:
                return

    async def _in_thread(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn)

    async def _save(self, batch: list[AttemptResult]) -> None:
        delay = 0.2
        while True:
            try:
                await self._in_thread(
                    lambda: self.store.complete(worker=self.worker_id, results=batch, now=self.clock())
                )
                break
            except StoreUnavailable as exc:
                # Keep the results: the leases are still ours for a while, and if this process dies
                # they expire and the deliveries are attempted again (at least once).
                log.warning(
                    "saving %d attempts failed (%s); retrying in %.1fs", len(batch), exc.message, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                # A bug, not an outage: retrying the same batch would fail the same way. Its
                # leases expire and the deliveries are attempted again (at least once).
                log.exception("saving %d attempts failed unexpectedly; they will be retried", len(batch))
                return
        for r in batch:
            if r.next_attempt_at is not None:
                self._wake_at(r.next_attempt_at)
