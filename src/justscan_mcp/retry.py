"""The retry schedule as a pure function: what happens after an attempt, given `now`.

Attempt 1 runs at once. After failure number n (n <= len(schedule)) the next attempt waits
schedule[n-1] seconds (1 min, 5 min, 30 min by default). After len(schedule)+1 failures the
delivery is `failed`. A test delivery has one attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

DeliveryState = Literal["pending", "retrying", "succeeded", "failed"]
DELIVERY_STATES: tuple[DeliveryState, ...] = ("pending", "retrying", "succeeded", "failed")


@dataclass(frozen=True)
class NextStep:
    """What the schedule decides after an attempt: the state, and when the next attempt runs."""

    state: DeliveryState
    next_attempt_at: datetime | None


def after_attempt(
    *,
    attempt_number: int,
    succeeded: bool,
    schedule: tuple[float, ...],
    now: datetime,
    single_attempt: bool = False,
) -> NextStep:
    """The delivery's state after attempt `attempt_number` (1-based) ended at `now`."""
    if succeeded:
        return NextStep("succeeded", None)
    if single_attempt or attempt_number > len(schedule):
        return NextStep("failed", None)
    return NextStep("retrying", now + timedelta(seconds=schedule[attempt_number - 1]))
