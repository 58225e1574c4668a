"""The cyclic garbage collector while a process starts: fewer young collections, then the defaults.

A `serve` start imports about a second of modules (the mcp SDK, pydantic, SQLAlchemy, SQLModel,
our models) that leave ~125,000 tracked objects behind, nearly all of them alive for as long as the
process. At CPython's default thresholds (700, 10, 10) the collector ran 293 times during one start
and walked that growing heap again and again: 134 to 181 ms of a 1.0 to 1.4 s start, measured with
`gc.callbacks` (docs/performance.md, cold start). With the youngest generation's threshold at
20,000 it runs about ten times, for about 60 ms.

Raised, not `gc.disable()`d: garbage is still collected, so a start that waits hours for its
database (the lifespan retries) does not grow without bound. Once the process has started,
`App.lifespan` freezes what exists and calls `started()`, and a running server collects at the
interpreter's own thresholds again. Nothing here runs unless the process entry (`__main__.main`)
asks for it: importing the package leaves the collector alone.
"""

from __future__ import annotations

import gc

# Measured against 10,000 (91 to 101 ms of collections in a start) and 50,000 (106 to 130 ms:
# fewer collections, each walking far more objects).
START_THRESHOLD = 20_000

_saved: tuple[int, int, int] | None = None


def relax_for_start() -> None:
    """Raise the youngest generation's threshold until `started()`; a second call does nothing."""
    global _saved
    if _saved is None:
        _saved = gc.get_threshold()
        gc.set_threshold(START_THRESHOLD, *_saved[1:])


def started() -> None:
    """Put back the thresholds `relax_for_start()` replaced (nothing if it was not called)."""
    global _saved
    if _saved is not None:
        gc.set_threshold(*_saved)
        _saved = None
