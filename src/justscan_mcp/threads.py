"""The one way async code runs a synchronous call (the service, the store) off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a worker thread, so the event loop never waits on IO."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
