"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds otherwise.

Used by `justscan-mcp db upgrade`, `bench/run.py` and `bench/soak.py`. A bar redrawn with
carriage returns is unreadable in a CI log or a file, so when the stream is not a terminal the
same progress comes out as ordinary lines ("recording events: 4,000/10,000 (40 %), 812/s"), at
most one per `every` seconds, plus one when the work ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

LINE_EVERY = 5.0  # seconds between two plain progress lines


class Progress:
    """Counts done units of `what` out of `total` (None: unknown), shown on `stream` (stderr by
    default, so a command's result on stdout stays clean)."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        every: float = LINE_EVERY,
        clock: Callable[[], float] = time.monotonic,
        bar: bool | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.every = every
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last_line = self.started
        self._closed = False
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=total, desc=what, unit=unit or "it", file=self.stream, leave=True)

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """`done` units done so far (for work counted elsewhere, e.g. arrivals at a receiver)."""
        step = done - self.done
        self.done = done
        if self._bar is not None:
            if step:
                self._bar.update(step)
            return
        now = self.clock()
        if now - self._last_line >= self.every:
            self._last_line = now
            self._line(now)

    def write(self, line: str) -> None:
        """A message of its own between progress updates (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _line(self, now: float, *, final: bool = False) -> None:
        elapsed = now - self.started
        count = f"{self.done:,}" + (f"/{self.total:,}" if self.total is not None else "")
        if self.total and not final:
            count += f" ({100 * self.done / self.total:.0f} %)"
        rate = f", {self.done / elapsed:,.0f}/s" if elapsed > 0 and self.done else ""
        unit = f" {self.unit}" if self.unit else ""
        end = f", done in {elapsed:.1f} s" if final else f", {elapsed:.0f} s"
        self.stream.write(f"{self.what}: {count}{unit}{rate}{end}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(self.clock(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
