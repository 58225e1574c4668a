"""The dispatcher: claims due deliveries with a lease, sends them, records every attempt.

Shape of one process's dispatcher:
- an APScheduler `AsyncIOScheduler` is the clock: a poll tick (`JUSTSCAN_POLL_INTERVAL`, for work
  recorded by other processes and for expired leases) and one timer at the earliest known retry
  time (one job, moved earlier when an earlier retry is scheduled; a job per retry would grow
  without bound behind a dead high-volume endpoint);
- `wake()` (thread-safe) starts a claim at once, which is how an event recorded in this process
  is on its way within milliseconds. Work recorded by other processes wakes it through LISTEN on
  PostgreSQL and, on SQLite, by a thread that looks at the newest delivery id every few ms;
- the pump claims for the free in-flight slots (`JUSTSCAN_MAX_IN_FLIGHT`) and, for a webhook
  with a backlog, up to one more per-webhook cap ahead: those wait in the process for a slot of
  their webhook and take it the moment a send ends, with no claim round trip between (see
  `_launch`). A delivery that waited too long for its lease to cover a whole send, or whose webhook
  turned slow, or that is still waiting when the process stops, is handed back to the database;
- `JUSTSCAN_MAX_IN_FLIGHT` long-lived sender coroutines take claimed deliveries from a queue and
  post them (http1, our keep-alive client; never blocking the MCP server's loop); a task per delivery cost ~20 µs of
  CPU each, a tenth of a delivery's budget. The database calls run in worker threads;
- one writer batches finished attempts into a single transaction.

Isolation: one webhook may hold at most `per_webhook_in_flight` slots (three quarters by default),
and a webhook whose attempt timed out or took half the timeout is "slow" until it answers fast
again: its deliveries then share the small slow lane (`slow_lane_in_flight`, an eighth) instead of
the main pool, like Svix's and Hookdeck's slow queues. So a receiver that never answers holds a few
slots, not all of them, and everyone else's deliveries do not wait behind its timeouts.

Leases belong to a claim (a random token per claim, in `lease_owner`), last the delivery timeout
plus a margin from the database's clock, and a result is saved only under the claim that sent it;
a process that dies delays its deliveries by at most that long; then any process claims them
again. Delivery is at least once: a process that
dies after a receiver answered but before the attempt was saved leads to one more attempt, with
the same X-Webhook-Delivery / webhook-id, which receivers use to deduplicate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial, wraps
from typing import Any, TypeVar

from justscan_mcp.config import Settings
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.metrics import Metrics
from justscan_mcp.models import DispatcherBeat, metric_outcome, utcnow
from justscan_mcp.retry import after_attempt
from justscan_mcp.sender import Sender, SendResult, delivery_headers
from justscan_mcp.store import (
    NOTIFY_CHANNEL,
    AttemptResult,
    Claimed,
    Claims,
    NewestDeliveryProbe,
    Purged,
    Store,
)

log = logging.getLogger("justscan_mcp.dispatcher")

WRITE_BATCH = 500
STOP_SAVE_GRACE = 3.0  # seconds a stopping process keeps trying to save results into a dead database
SQLITE_WATCH_INTERVAL = 0.005  # seconds between two looks at SQLite's newest delivery id
# The retention sweep: every 10 minutes (first a minute after start), batches of 1,000 rows,
# at most 50 batches a run so one run never holds the database for long.
RETENTION_INTERVAL = 600.0
RETENTION_FIRST_RUN = 60.0
RETENTION_BATCH = 1000
RETENTION_MAX_BATCHES = 50
# How often the auto-disable check runs (at most; twice per JUSTSCAN_DISABLE_AFTER when shorter).
DISABLE_CHECK_INTERVAL = 60.0
_T = TypeVar("_T")


def attempt_fields(result: AttemptResult) -> dict[str, object]:
    """The one log line of an attempt: ids, what the receiver did, and what happens next. Never
    the URL, the body or anything secret."""
    return {
        "delivery_id": result.delivery_id,
        "webhook_id": result.webhook_id,
        "team_id": result.team_id,
        "event": result.event,
        "attempt": result.number,
        "outcome": metric_outcome(result.status_code, result.error),
        "status": result.status_code,
        "duration_ms": result.duration_ms,
        "state": result.state,
        "next_attempt_at": result.next_attempt_at.isoformat() if result.next_attempt_at else None,
    }


def _count_out(counts: dict[int, int], key: int) -> int:
    """One less for `key`, dropping it at zero (the dicts of counts stay as small as the set of
    busy webhooks); what is left."""
    left = counts.get(key, 1) - 1
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)
    return left


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
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
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
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._started = False
        self._jobs: asyncio.Queue[tuple[Claimed, bool] | None] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []
        # Isolation: sends in flight per webhook, webhooks known to be slow, the slow lane's use.
        self._per_hook: dict[int, int] = {}  # claimed and not yet finished, per webhook
        self._sending: dict[int, int] = {}  # of those, sends started (queued for or in a sender)
        # Claimed ahead: deliveries waiting for a send slot of their webhook, with when they were
        # claimed (monotonic). A claim costs about the same for 1 row as for 40, and its round
        # trip is where one webhook's sends used to wait: with room to claim only for free slots,
        # one worker on one webhook kept 12-18 of its 48 slots busy on PostgreSQL.
        self._waiting: dict[int, collections.deque[tuple[Claimed, float]]] = {}
        self._cap = settings.per_webhook_in_flight
        self._claim_cap = 2 * self._cap  # sending plus waiting, per webhook
        self._budget = settings.max_in_flight + self._cap  # sending plus waiting, in all
        self._handing_back: set[asyncio.Task[None]] = set()
        self._running_jobs: set[asyncio.Task[Any]] = set()  # scheduler jobs under way (see _job)
        self._slow: set[int] = set()
        self._slow_open = 0
        # Finished attempts waiting for the writer: a list and an event, cheaper per item than a
        # queue. Two database threads of our own, not the shared pool: a claim and a save run
        # side by side, and no request handler's thread work queues behind them.
        self._results: list[AttemptResult] = []
        self._results_ready = asyncio.Event()
        # Told the ids of test deliveries whose attempt was just saved (their callers wait).
        self.on_saved: Callable[[list[int]], None] = lambda ids: None
        self._closing = False
        self._give_up_at = float("inf")
        self._db = ThreadPoolExecutor(max_workers=2, thread_name_prefix="justscan-db")
        self._tasks: list[asyncio.Task[None]] = []
        # Webhooks the last full claim took from, and webhooks over the near-cap line (see _pump).
        self._backlog_hooks: set[int] = set()
        self._capped: set[int] = set()
        self._scheduler: Any = None
        self._timer_at: datetime | None = None
        self._arming: set[asyncio.Task[None]] = set()  # reads of the next retry time (_retry_due)
        self._listener: asyncio.Task[None] | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Liveness: when the claim loop last turned (monotonic), and when this process started.
        self.last_turn = time.monotonic()
        self.started_at = clock()
        self._stall_reported = False
        # When the database stopped answering this dispatcher (monotonic), for one line at the
        # start of an outage and one at its end, with the retries between them at warning.
        self._outage_since: float | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._loop = asyncio.get_running_loop()
        await self.sender.start()
        scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=UTC)
        scheduler.add_job(
            self._job(self._tick),
            "interval",
            seconds=self.settings.poll_interval,
            id="poll",
            coalesce=True,
            max_instances=1,
        )
        scheduler.add_job(
            self._job(self.sweep),
            "interval",
            seconds=RETENTION_INTERVAL,
            next_run_time=datetime.now(UTC) + timedelta(seconds=RETENTION_FIRST_RUN),
            id="retention",
            coalesce=True,
            max_instances=1,
        )
        scheduler.add_job(
            self._job(self.heartbeat),
            "interval",
            seconds=self.settings.poll_interval,
            id="heartbeat",
            coalesce=True,
            max_instances=1,
        )
        if self.settings.disable_after > 0:
            scheduler.add_job(
                self._job(self.disable_failing),
                "interval",
                seconds=min(DISABLE_CHECK_INTERVAL, self.settings.disable_after / 2),
                id="disable-failing",
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
        probe = self.store.newest_delivery_probe()
        if probe is not None:
            self._watcher = threading.Thread(
                target=self._watch_sqlite, args=(probe,), name="justscan-sqlite-watch", daemon=True
            )
            self._watcher.start()
        self._started = True
        self.metrics.bind_dispatcher(lambda: float(self.in_flight), lambda: time.monotonic() - self.last_turn)
        log.info(
            "dispatcher %s started (max %d in flight, %d per webhook, slow lane %d)",
            self.worker_id,
            self.settings.max_in_flight,
            self.settings.per_webhook_in_flight,
            self.settings.slow_lane_in_flight,
        )
        self.wake()

    async def stop(self) -> None:
        """Graceful stop: claim nothing more, let in-flight sends finish (each is bounded by the
        delivery timeout), save their attempts, then close. With the database down, saving is
        tried for `STOP_SAVE_GRACE` seconds and then left: those deliveries' leases expire and
        they are sent again (at least once), so stopping never hangs on an outage. Safe to call
        on a dispatcher whose start() did not finish."""
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        self._watch_stop.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if len(self._tasks) == 2:
            pump, writer = self._tasks
            await pump
            # Claimed ahead and not started: back to the database, due at once for any process,
            # rather than sent now (a stop waits for sends already started, not for a backlog)
            # or left to their leases.
            waiting = [job for queue in self._waiting.values() for job, _ in queue]
            self._waiting.clear()
            self._hand_back(waiting)
            if self._handing_back:
                await asyncio.wait(self._handing_back, timeout=STOP_SAVE_GRACE)
            if self._open:
                log.info("dispatcher %s: waiting for %d in-flight sends", self.worker_id, self._open)
            for _ in self._senders:
                self._jobs.put_nowait(None)  # after every queued job: the queue is first in, first out
            await asyncio.gather(*self._senders, return_exceptions=True)
            self._give_up_at = time.monotonic() + STOP_SAVE_GRACE
            self._closing = True
            self._results_ready.set()
            await writer
        if self._scheduler is not None:
            # No job starts from here; one under way (a heartbeat whose write queued behind the
            # last save, say) finishes first. APScheduler's shutdown cancels a running coroutine
            # job and logs that as its error, and a beat cancelled mid-write still lands from its
            # thread, after drop_beat below.
            self._scheduler.pause()
            if self._running_jobs:
                await asyncio.wait(self._running_jobs, timeout=STOP_SAVE_GRACE)
            self._scheduler.shutdown(wait=False)
        for task in list(self._arming):  # a read whose answer no timer will use now
            task.cancel()
        await asyncio.gather(*self._arming, return_exceptions=True)
        with contextlib.suppress(Exception):  # best effort: a dead row ages out by itself
            await asyncio.wait_for(self._in_thread(partial(self.store.drop_beat, self.worker_id)), 2.0)
        await self.sender.close()
        self._db.shutdown(wait=False)
        self.metrics.unbind_dispatcher()
        log.info("dispatcher %s stopped", self.worker_id)

    def _job(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """`fn` as a scheduler job whose run the stop can wait for."""

        @wraps(fn)
        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None  # a coroutine job runs in a task of the loop
            self._running_jobs.add(task)
            try:
                await fn()
            finally:
                self._running_jobs.discard(task)

        return run

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
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(self._wake.set)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return at once when the dispatcher is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

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
                await self._pause(delay)
                delay = min(delay * 2, 10.0)

    def _watch_sqlite(self, probe: NewestDeliveryProbe) -> None:
        """SQLite's cross-process wake-up: every few milliseconds, look at the newest delivery id.
        A delivery recorded by another process, such as a `serve --no-dispatcher`, is seen within
        milliseconds. `PRAGMA data_version` would also fire on this process's own saves and
        claims: each such wake cost an empty claim walking the backlog. The poll tick stays the
        fallback."""
        unread = object()
        last: object = unread  # the newest id is None while the table is empty
        while not self._watch_stop.wait(SQLITE_WATCH_INTERVAL):
            try:
                newest = probe.read()
            except sqlite3.Error:
                self._watch_stop.wait(0.5)
                continue
            if last is not unread and newest != last:
                self.wake()
            last = newest
        probe.close()

    async def _tick(self) -> None:
        self._wake.set()

    def _wake_at(self, when: datetime) -> None:
        """Make sure the one retry timer fires no later than `when`."""
        if self._scheduler is None or self._stopping:
            return
        if self._timer_at is not None and self._timer_at <= when:
            return
        self._timer_at = when
        self._scheduler.add_job(
            self._retry_due, "date", run_date=when, id="retry", replace_existing=True, misfire_grace_time=None
        )

    def _db_failed(self, operation: str, exc: StoreUnavailable, retry_in: float, *, what: str = "") -> None:
        """Count a failed database operation (`operation` is a metric label: a fixed word);
        say loudly when an outage begins."""
        self.metrics.database_errors.labels(operation, "unavailable").inc()
        reason = exc.message.splitlines()[0].removeprefix("database unavailable: ")
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.error(
                "database unavailable (%s failed: %s): deliveries wait and nothing is lost; "
                "retrying in %.1fs",
                what or operation,
                reason,
                retry_in,
            )
        else:
            log.warning("%s failed again (%s); retrying in %.1fs", what or operation, reason, retry_in)

    def _db_answered(self) -> None:
        """The database answered: end an outage, if one was reported."""
        if self._outage_since is not None:
            log.warning(
                "database reachable again after %.1fs; delivering", time.monotonic() - self._outage_since
            )
            self._outage_since = None

    async def sweep(self) -> Purged:
        """The retention job: delete, in batches, finished deliveries older than
        JUSTSCAN_RETENTION_DAYS (0 keeps them), events left without deliveries, and expired
        idempotency keys. A database outage is logged and the next run tries again."""
        days = self.settings.retention_days
        total = Purged()
        for _ in range(RETENTION_MAX_BATCHES):
            now = self.clock()
            before = now - timedelta(days=days) if days > 0 else None
            try:
                done = await self._in_thread(
                    partial(self.store.purge, before=before, now=now, batch=RETENTION_BATCH)
                )
            except StoreUnavailable as exc:
                log.warning("retention sweep postponed: %s", exc.message.splitlines()[0])
                break
            total = Purged(
                deliveries=total.deliveries + done.deliveries,
                events=total.events + done.events,
                idempotency_keys=total.idempotency_keys + done.idempotency_keys,
                skipped=done.skipped,
            )
            if done.skipped or max(done.deliveries, done.events, done.idempotency_keys) < RETENTION_BATCH:
                break
        if total.deliveries or total.events or total.idempotency_keys:
            log.info(
                "retention: deleted %d deliveries, %d events, %d idempotency keys",
                total.deliveries,
                total.events,
                total.idempotency_keys,
            )
        return total

    async def disable_failing(self) -> list[int]:
        """The auto-disable job: switch off webhooks whose failure streak is older than
        JUSTSCAN_DISABLE_AFTER with at least 3 failed deliveries in it (their open deliveries end
        `failed`, kept for recovery). A database outage is logged and the next run tries again."""
        now = self.clock()
        try:
            ids = await self._in_thread(
                partial(
                    self.store.disable_failing,
                    started_before=now - timedelta(seconds=self.settings.disable_after),
                    now=now,
                )
            )
        except StoreUnavailable as exc:
            log.warning("auto-disable check postponed: %s", exc.message.splitlines()[0])
            return []
        for webhook_id in ids:
            log.warning("webhook %s switched off: failing for longer than JUSTSCAN_DISABLE_AFTER", webhook_id)
        if ids:
            self.metrics.auto_disabled.inc(len(ids))
        return ids

    async def _retry_due(self) -> None:
        """The retry timer fired: claim, and set the timer to the next retry time still ahead.

        The read of that time runs in a task of its own, not in the scheduler's job: a job still
        waiting on the database when a retry saved meanwhile brought the timer due again made
        APScheduler skip that firing (with a warning), and the timer, believing itself armed,
        was never set again; every later retry waited for the poll tick."""
        self._timer_at = None
        self._wake.set()
        task = asyncio.create_task(self._arm_for_next_retry(self.clock()), name="justscan-next-retry")
        self._arming.add(task)
        task.add_done_callback(self._arming.discard)

    async def _arm_for_next_retry(self, now: datetime) -> None:
        try:
            nxt = await self._in_thread(partial(self.store.next_due_after, now))
        except Exception as exc:  # the poll tick still finds the work; say why the timer could not
            log.warning("could not read the next retry time (%s)", exc)
            return
        if nxt is not None:
            self._wake_at(nxt)

    # --- the pump ---------------------------------------------------------------------------

    def _plan(self, free: int) -> tuple[list[int], int, list[int], int]:
        """What to claim now: (webhooks the main claim skips, its limit, the slow webhooks the
        slow-lane claim may take, its limit).

        The cap here is on what a webhook has claimed, sending and waiting (`_claim_cap`, twice
        the cap on its sends). The main limit never exceeds the room left under it for any
        webhook the claim may take from, so no claim overshoots. Webhooks at it are skipped. So are
        those within an eighth of it (`_near_cap`) when their little room would cut a claim that
        other webhooks' work could fill (a claim of 16 rows costs about what one of 1 row does)."""
        cap = self._claim_cap
        counts = {w: n for w, n in self._per_hook.items() if w not in self._slow}
        skipped = {w for w, n in counts.items() if n >= cap} | self._slow
        room = cap - max((n for w, n in counts.items() if w not in skipped), default=0)
        near = self._near_cap()
        if room < min(free, cap - near):
            skipped |= {w for w, n in counts.items() if n > near}
            room = cap - max((n for w, n in counts.items() if w not in skipped), default=0)
        excluded = sorted(skipped)
        main_limit = min(free, room)
        slow_room = min(free, self.settings.slow_lane_in_flight - self._slow_open)
        slow = sorted(self._slow) if slow_room > 0 else []
        return excluded, main_limit, slow, slow_room

    def _claim(self, plan: tuple[list[int], int, list[int], int]) -> tuple[Claims, Claims]:
        """Both claims of one pump round, in a database thread."""
        excluded, main_limit, slow, slow_limit = plan
        now = self.clock()
        lease = self.settings.lease_seconds
        main = Claims([])
        if main_limit > 0:
            main = self.store.claim_due(
                claim=secrets.token_hex(12), now=now, lease_seconds=lease, limit=main_limit, exclude=excluded
            )
        lane = Claims([])
        if slow and slow_limit > 0:
            lane = self.store.claim_due(
                claim=secrets.token_hex(12), now=now, lease_seconds=lease, limit=slow_limit, only=slow
            )
        return main, lane

    def stalled_for(self) -> float | None:
        """Seconds since the claim loop last turned, when that is over three poll intervals (a
        healthy loop turns at every poll tick, even with every slot busy); None otherwise."""
        age = time.monotonic() - self.last_turn
        return age if age > 3 * self.settings.poll_interval and not self._stopping else None

    async def heartbeat(self) -> None:
        """Record this dispatcher as alive in the database, but only while its claim loop turns:
        a wedged loop stops beating, which is what readiness and `status` look for."""
        stalled = self.stalled_for()
        if stalled is not None:
            if not self._stall_reported:
                log.error(
                    "dispatcher %s: claim loop stuck for %.1fs; heartbeat withheld", self.worker_id, stalled
                )
                self._stall_reported = True
            return
        if self._stall_reported:
            log.warning("dispatcher %s: claim loop turning again", self.worker_id)
            self._stall_reported = False
        beat = DispatcherBeat(
            worker_id=self.worker_id,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            started_at=self.started_at,
            last_beat_at=self.clock(),
            interval_seconds=self.settings.poll_interval,
            in_flight=self.in_flight,
        )
        # An outage is the claim loop's to report; the next beat tries again.
        try:
            await self._in_thread(partial(self.store.beat, beat))
        except StoreUnavailable:
            self.metrics.database_errors.labels("heartbeat", "unavailable").inc()

    async def _pump(self) -> None:
        delay = 0.5
        while not self._stopping:
            self.last_turn = time.monotonic()
            self._wake.clear()
            free = self._budget - self._open
            if free > 0:
                plan = self._plan(free)
                # What wakes the pump from _done is decided anew after this claim, from the
                # counts then: a wake for the state before the claim would only cost an empty one.
                held_back, self._capped, self._backlog_hooks = self._capped, set(), set()
                claimed_at = time.monotonic()
                try:
                    main, lane = await self._in_thread(partial(self._claim, plan))
                    delay = 0.5
                except StoreUnavailable as exc:
                    self._db_failed("claim", exc, delay)
                    await self._pause(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                except Exception:
                    # A bug, not an outage: say so loudly, but keep the pump alive (a dead pump
                    # would stop every delivery of this process without a word).
                    self.metrics.database_errors.labels("claim", "error").inc()
                    log.exception("claim failed unexpectedly; retrying in %.1fs", delay)
                    await self._pause(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self._db_answered()
                self._claimed(main, lane)
                for batch in (main, lane):
                    # A rate-limited webhook held back: claim from it again when its gate opens.
                    if batch.gate_opens_at is not None:
                        self._wake_at(batch.gate_opens_at)
                for job in main:
                    self._launch(job, slow=False, claimed_at=claimed_at)
                for job in lane:
                    self._launch(job, slow=True, claimed_at=claimed_at)
                # A full claim means more work is likely waiting for the webhooks it came from.
                # Claim again at once, or as slots free up (_done), but only while one of those
                # webhooks may still be claimed from: a claim that must skip the only busy
                # webhook would walk its whole backlog for nothing. A webhook over the near-cap
                # line wakes the pump itself when it falls back under it.
                full = plan[1] > 0 and len(main) == plan[1]
                self._backlog_hooks = {j.webhook_id for j in main} if full else set()
                near = self._near_cap()
                self._capped = {w for w, n in self._per_hook.items() if n > near}
                released = held_back - self._capped  # fell under the line while we claimed
                if (self._claimable_backlog() or released) and self._open < self._budget:
                    continue
            await self._wake.wait()

    def _claimed(self, main: Claims, lane: Claims) -> None:
        """Count a pump round's claims, and say which deliveries were taken over."""
        sizes = self.metrics.claim_size
        sizes.observe(len(main))
        if lane or self._slow:
            sizes.observe(len(lane))
        taken = main.taken_over + lane.taken_over
        if taken:
            self.metrics.taken_over.inc(len(taken))
            shown = ", ".join(map(str, taken[:10])) + (" ..." if len(taken) > 10 else "")
            log.warning(
                "dispatcher %s took over %d deliveries whose lease had expired (a worker died or "
                "stalled mid-send; receivers may see them twice, same delivery id): %s",
                self.worker_id,
                len(taken),
                shown,
            )

    def _near_cap(self) -> int:
        """The line above which a webhook's little room to claim does not start a claim of its own
        (it waits to fall back under it): an eighth of `_claim_cap` under it. A quarter made one
        webhook's backlog wait for its sends to drain before every claim; with an eighth, one
        worker on one webhook delivered 0.64-0.65 of the bare client's rate on SQLite instead of
        0.56-0.57 (PostgreSQL: median 0.46 against 0.43, five runs each)."""
        cap = self._claim_cap
        return cap - max(1, cap // 8)

    def _claimable_backlog(self) -> bool:
        return any(w not in self._capped and w not in self._slow for w in self._backlog_hooks)

    @property
    def _open(self) -> int:
        """Claimed by this process and not yet finished (sending or waiting), in all."""
        return sum(self._per_hook.values())

    @property
    def in_flight(self) -> int:
        """Sends started and not finished (claimed, less what waits for a slot)."""
        return sum(self._sending.values())

    def _launch(self, job: Claimed, *, slow: bool, claimed_at: float) -> None:
        hook = job.webhook_id
        self._per_hook[hook] = self._per_hook.get(hook, 0) + 1
        if slow:
            self._slow_open += 1
        elif self._sending.get(hook, 0) >= self._cap:
            self._waiting.setdefault(hook, collections.deque()).append((job, claimed_at))
            return
        self._send(job, slow)

    def _send(self, job: Claimed, slow: bool) -> None:
        self._sending[job.webhook_id] = self._sending.get(job.webhook_id, 0) + 1
        self._jobs.put_nowait((job, slow))

    def _next_waiting(self, hook: int) -> None:
        """A send of `hook` ended: start its next waiting delivery, if one may still be sent.

        A lease lasts the delivery timeout plus the margin from its claim, so a send that starts
        more than the margin after the claim could outlive it and be taken over mid-send. Waits
        are milliseconds while the webhook answers fast (a send that takes half the timeout moves
        the webhook to the slow lane, handing its waiting ones back), so this is the guard for a
        small configured margin: those that waited half the margin go back to the database."""
        queue = self._waiting.get(hook)
        if not queue:
            return
        stale: list[Claimed] = []
        # A claim under way when the webhook turned slow can still have added to its queue.
        limit = float("inf") if hook in self._slow else time.monotonic() - self.settings.lease_margin / 2
        while queue and queue[0][1] < limit:
            stale.append(queue.popleft()[0])
        if queue:
            job, _ = queue.popleft()
            self._send(job, False)
        if not queue:
            del self._waiting[hook]
        self._hand_back(stale)

    def _hand_back(self, jobs: list[Claimed]) -> None:
        """Waiting deliveries, already taken out of their queues, leave without a send: count them
        out, and release them in the background; then look for work, as they are due again. If
        the database does not answer, their leases expire instead: sent later, never lost."""
        if not jobs:
            return
        by_claim: dict[str, list[int]] = {}
        for job in jobs:
            _count_out(self._per_hook, job.webhook_id)
            by_claim.setdefault(job.claim, []).append(job.delivery_id)

        def release() -> None:
            for claim, ids in by_claim.items():
                self.store.release(claim=claim, delivery_ids=ids)

        async def run() -> None:
            try:
                await self._in_thread(release)
            except Exception as exc:
                log.warning(
                    "dispatcher %s could not hand back %d unsent deliveries (%s); they are sent "
                    "again when their leases expire",
                    self.worker_id,
                    len(jobs),
                    exc,
                )
            else:
                self._wake.set()

        task = asyncio.create_task(run(), name="justscan-hand-back")
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def _send_loop(self) -> None:
        while (item := await self._jobs.get()) is not None:
            job, slow = item
            try:
                await self._deliver(job)
            except Exception:
                # _deliver turns its own failures into a failed attempt; this is the last guard.
                log.exception("delivery %s: unexpected error while sending", job.delivery_id)
            finally:
                self._done(job, slow)

    def _done(self, job: Claimed, slow: bool) -> None:
        hook = job.webhook_id
        _count_out(self._sending, hook)
        left = _count_out(self._per_hook, hook)
        if slow:
            self._slow_open -= 1
        if self._stopping:
            return
        if slow:
            self._wake.set()  # a slot of the slow lane is free
            return
        self._next_waiting(hook)
        if hook in self._capped and left <= self._near_cap():
            # A webhook that claims had to hold back fell to where they take from it again.
            self._capped.discard(hook)
            self._wake.set()
            return
        # Under a backlog, claim again once a quarter of the slots are free: one claim of 16 rows
        # costs about what one of 1 row does, so trickling claims would cap the send rate.
        claimed = self._open
        free = self._budget - claimed
        if self._claimable_backlog() and (free >= max(1, self.settings.max_in_flight // 4) or not claimed):
            self._wake.set()

    def _note_speed(self, webhook_id: int, outcome: SendResult) -> None:
        """Move a webhook into the slow lane when it eats the timeout, and out when it answers
        fast again."""
        limit_ms = self.settings.delivery_timeout * 1000
        if outcome.duration_ms >= limit_ms / 2:  # a timeout takes the whole timeout
            if webhook_id not in self._slow:
                log.info(
                    "webhook %s is slow (%d ms); its deliveries use the slow lane",
                    webhook_id,
                    outcome.duration_ms,
                )
                self._slow.add(webhook_id)
                # What it claimed ahead would take main slots for its timeouts: hand it back, for
                # the slow lane to claim.
                self._hand_back([job for job, _ in self._waiting.pop(webhook_id, ())])
        elif (
            webhook_id in self._slow
            and outcome.status_code is not None
            and outcome.duration_ms < limit_ms / 4
        ):
            log.info("webhook %s answers fast again; back to the main pool", webhook_id)
            self._slow.discard(webhook_id)

    async def _deliver(self, job: Claimed) -> None:
        started = self.clock()
        try:
            headers = delivery_headers(
                signing_secrets=list(job.signing_secrets),
                delivery_id=job.delivery_id,
                event=job.event,
                body=job.payload,
                timestamp=int(time.time()),
                attempt=job.attempt_number,
            )
            outcome = await self.sender.post(job.url, job.payload, headers)
        except Exception as exc:
            # Anything before a receiver's answer exists (a malformed stored secret, a library
            # error) is a failed attempt, logged like any other: otherwise the lease would expire
            # and the same error repeat forever without the delivery ever ending.
            log.exception("delivery %s: could not be sent", job.delivery_id)
            outcome = SendResult(None, None, f"internal error: {type(exc).__name__}: {exc}"[:500], 0)
        self._note_speed(job.webhook_id, outcome)
        self._results.append(self._result(job, outcome, started))
        self._results_ready.set()

    def _result(self, job: Claimed, outcome: SendResult, started: datetime) -> AttemptResult:
        state = after_attempt(
            attempt_number=job.attempt_number,
            succeeded=outcome.succeeded,
            schedule=self.settings.retry_schedule,
            now=self.clock(),
            single_attempt=job.is_test,
            status_code=outcome.status_code,
            retry_after=outcome.retry_after,
        )
        return AttemptResult(
            delivery_id=job.delivery_id,
            claim=job.claim,
            number=job.attempt_number,
            started_at=started,
            duration_ms=outcome.duration_ms,
            status_code=outcome.status_code,
            response_body=outcome.response_body,
            error=outcome.error,
            state=state.state,
            next_attempt_at=state.next_attempt_at,
            single_attempt=job.is_test,
            retry_after=state.retry_after,
            note=state.note,
            webhook_id=job.webhook_id,
            team_id=job.team_id,
            event=job.event,
            created_at=job.created_at,
        )

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

    def _complete(self, results: list[AttemptResult]) -> list[int]:
        """Save a batch, then log and count its saved attempts, here in the database thread: a
        log line per attempt written from the event loop cost a fifth of a worker's throughput
        (measured). Only what was saved is counted, so the counters match the delivery log."""
        applied = self.store.complete(worker=self.worker_id, results=results, now=self.clock())
        saved = set(applied)
        m = self.metrics
        m.save_size.observe(len(applied))
        logging_on = log.isEnabledFor(logging.INFO)
        for r in results:
            if r.delivery_id not in saved:
                continue
            m.attempts[metric_outcome(r.status_code, r.error)].inc()
            m.attempt_duration.observe(r.duration_ms / 1000)
            if r.number == 1 and r.created_at is not None:
                m.first_attempt_latency.observe(max(0.0, (r.started_at - r.created_at).total_seconds()))
            if r.retry_after is not None:
                m.retry_after.inc()
            if logging_on:
                log.info("attempt", extra={"fields": attempt_fields(r)})
        return applied

    async def _save(self, batch: list[AttemptResult]) -> None:
        delay = 0.2
        while True:
            try:
                await self._in_thread(partial(self._complete, batch))
                self._db_answered()
                self._saved(batch)
                break
            except StoreUnavailable as exc:
                # Keep the results: the leases are still ours for a while, and if this process dies
                # they expire and the deliveries are attempted again (at least once).
                if self._closing and time.monotonic() >= self._give_up_at:
                    log.warning(
                        "stopping with %d attempts unsaved (%s); their deliveries are sent again "
                        "once their leases expire",
                        len(batch),
                        exc.message.splitlines()[0],
                    )
                    return
                self._db_failed("save", exc, delay, what=f"saving {len(batch)} attempts")
                await asyncio.sleep(min(delay, max(0.05, self._give_up_at - time.monotonic())))
                delay = min(delay * 2, 10.0)
            except Exception:
                # Not an outage: one row the database refuses must not take the batch with it
                # (every other delivery in it would be sent again, and that row forever).
                self.metrics.database_errors.labels("save", "error").inc()
                log.exception("saving %d attempts failed; saving them one by one", len(batch))
                await self._save_each(batch)
                break
        for r in batch:
            if r.next_attempt_at is not None:
                self._wake_at(r.next_attempt_at)

    def _saved(self, batch: list[AttemptResult]) -> None:
        tests = [r.delivery_id for r in batch if r.single_attempt]
        if tests:
            self.on_saved(tests)

    async def _save_each(self, batch: list[AttemptResult]) -> None:
        """Save row by row; a row the database refuses becomes a failed attempt that says why."""
        for r in batch:
            try:
                await self._in_thread(partial(self._complete, [r]))
                self._saved([r])
                continue
            except StoreUnavailable as exc:
                log.warning(
                    "delivery %s: result not saved (%s); sent again after its lease", r.delivery_id, exc
                )
                continue
            except Exception as exc:
                reason = f"the attempt's result could not be stored: {type(exc).__name__}: {exc}"
                log.warning("delivery %s: %s", r.delivery_id, reason.splitlines()[0])
            state = after_attempt(
                attempt_number=r.number,
                succeeded=False,
                schedule=self.settings.retry_schedule,
                now=self.clock(),
                single_attempt=r.single_attempt,
            )
            failed = replace(
                r,
                status_code=None,
                response_body=None,
                error=reason.splitlines()[0][:500],
                state=state.state,
                next_attempt_at=state.next_attempt_at,
                retry_after=None,
                note=None,
            )
            try:
                await self._in_thread(partial(self._complete, [failed]))
                self._saved([failed])
            except Exception:
                log.exception("delivery %s: not even its failure could be saved", r.delivery_id)
