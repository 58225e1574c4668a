"""A webhook's rate limit as a pure function: how many deliveries may go now, given `now`.

The limit is a token bucket kept as one time per webhook, the "theoretical arrival time" of the
generic cell rate algorithm (GCRA): the bucket holds `rate` tokens (one second's worth, the
largest burst) and refills at `rate` per second; `tat` is when it would be full again. One time
instead of a count and a refill stamp is what lets every process on the database share one
bucket with a single row update.

Deliveries over the limit are not claimed at all: the webhook's gate (`open_at`) says when a
claim may take from it again. A gate that opened for every single token would cost a claim per
token at high rates, so after a shortfall it opens when a tenth of a second's worth is back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

RATE_LIMIT_MIN = 1
RATE_LIMIT_MAX = 1000
BURST_SECONDS = 1.0  # the bucket holds this many seconds' worth of tokens
GATE_OPENINGS_PER_SECOND = 10  # at most this many claims a second for a webhook held back


@dataclass(frozen=True)
class Grant:
    """What a claim may send for one webhook: `granted` deliveries; the bucket's new `tat`; and
    `open_at`, when claims may take from the webhook again (None: at once)."""

    granted: int
    tat: datetime
    open_at: datetime | None


def take(*, rate: int, tat: datetime | None, now: datetime, wanted: int) -> Grant:
    """Take up to `wanted` tokens at `now` from a bucket of `rate` per second whose theoretical
    arrival time is `tat` (None: a full bucket)."""
    step = 1.0 / rate
    base = now if tat is None or tat < now else tat
    # Tokens in the bucket: a full second's worth when base == now, fewer when tat runs ahead.
    # The epsilon keeps float error from losing a token that is exactly due.
    available = math.floor(((now - base).total_seconds() + BURST_SECONDS) * rate + 1e-6)
    granted = max(0, min(wanted, available))
    new_tat = base + timedelta(seconds=granted * step)
    short = wanted - granted
    need = 1 if short == 0 else min(short, max(1, math.ceil(rate / GATE_OPENINGS_PER_SECOND)))
    open_at = new_tat - timedelta(seconds=BURST_SECONDS - need * step)
    return Grant(granted=granted, tat=new_tat, open_at=open_at if open_at > now else None)
