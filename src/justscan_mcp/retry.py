"""The retry schedule as a pure function: what happens after an attempt, given `now`.

Attempt 1 runs at once. After failure number n (n <= len(schedule)) the next attempt waits
schedule[n-1] seconds (1 min, 5 min, 30 min by default). After len(schedule)+1 failures the
delivery is `failed`. A test delivery has one attempt.

The receiver can speak too:
- `429` or `503` with `Retry-After` (delta-seconds or an HTTP-date): the next attempt waits the
  later of the schedule's step and `Retry-After`, at most `RETRY_AFTER_CAP` past the step;
- `410 Gone`: the delivery fails at once, with no further retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Literal

DeliveryState = Literal["pending", "retrying", "succeeded", "failed"]
DELIVERY_STATES: tuple[DeliveryState, ...] = ("pending", "retrying", "succeeded", "failed")

# How far past the schedule's step a receiver's Retry-After may push the next attempt.
RETRY_AFTER_CAP = 3600.0
RETRY_AFTER_STATUSES = (429, 503)
GONE = 410
GONE_NOTE = "gone: the receiver answered 410 Gone, so no more attempts are made"


@dataclass(frozen=True)
class NextStep:
    """What the schedule decides after an attempt: the state, when the next attempt runs, the
    Retry-After it honoured (seconds) and why it stopped early (a note for the log)."""

    state: DeliveryState
    next_attempt_at: datetime | None
    retry_after: float | None = None
    note: str | None = None


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date (a date in the
    past is 0). None for a missing or unreadable value."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def after_attempt(
    *,
    attempt_number: int,
    succeeded: bool,
    schedule: tuple[float, ...],
    now: datetime,
    single_attempt: bool = False,
    status_code: int | None = None,
    retry_after: str | None = None,
) -> NextStep:
    """The delivery's state after attempt `attempt_number` (1-based) ended at `now`, given the
    receiver's status code and `Retry-After` header."""
    if succeeded:
        return NextStep("succeeded", None)
    if status_code == GONE and not single_attempt:
        return NextStep("failed", None, note=GONE_NOTE)
    if single_attempt or attempt_number > len(schedule):
        return NextStep("failed", None)
    step = schedule[attempt_number - 1]
    asked = parse_retry_after(retry_after, now=now) if status_code in RETRY_AFTER_STATUSES else None
    if asked is None:
        return NextStep("retrying", now + timedelta(seconds=step))
    wait = min(max(step, asked), step + RETRY_AFTER_CAP)
    return NextStep("retrying", now + timedelta(seconds=wait), retry_after=asked)
