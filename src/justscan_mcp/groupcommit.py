"""Group commit: concurrent callers' items written together, one transaction per batch.

While one batch is being written (in a worker thread), the items that arrive wait; when it is
done, everything that waits goes together in the next one. An idle caller is written at once (no
timer, no added delay); under load the batches grow by themselves with the arrival rate, which is
how databases and queues reach high commit rates. Each caller is answered only after the
transaction holding its item committed.

Back-pressure instead of an unbounded queue: past `max_waiting` waiting items, `submit` refuses
with `Overloaded` (HTTP 429 with Retry-After) until the database catches up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from justscan_mcp.errors import Overloaded
from justscan_mcp.threads import in_thread

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 1000
MAX_WAITING = 5000


class GroupCommit(Generic[T, R]):
    """`write(items)` returns one result per item, in order; it raises only when the whole batch
    failed (every caller of the batch gets that error)."""

    def __init__(
        self,
        write: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        writers: int = 1,
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        # Batches written at the same time. More than one lets one batch's round trips hide
        # another's where transactions overlap (PostgreSQL), at the price of smaller batches,
        # each paying the transaction's fixed cost; POST /events measured best with one on both
        # databases (rest_api.FastIngest says by how much).
        self.writers = writers
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Write `item` with whatever else waits; its result once committed.

        Raises:
            Overloaded: too many items wait already.
            whatever `write` raised for the batch holding the item.
        """
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self._waiting)} events are waiting to be recorded; retry in a second")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # A finished writer may not have run its done-callbacks yet: count the live ones.
        self._running = {t for t in self._running if not t.done()}
        if len(self._running) < self.writers:
            self._running.add(asyncio.create_task(self._drain(), name="justscan-group-commit"))
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            try:
                results = await in_thread(self._write, [item for item, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a caller that went away (its future was cancelled)
                    future.set_result(result)
