"""Clocks, medians and progress for ``kvcore bench``.

Every figure the bench reports is a median over repeats, taken after a warm-up, with
its baseline timed in the same process (interleaved with it where the workload
allows), so a ratio survives a noisy machine even when absolute numbers do not.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = ["Progress", "Stopwatch", "clock", "median", "spread", "timed"]

#: The one clock every workload uses: monotonic, the best resolution the OS offers.
clock = time.perf_counter


def median(samples: Sequence[float]) -> float:
    """The median of ``samples`` (``nan`` when there are none, so a bug shows)."""
    return float(statistics.median(samples)) if samples else float("nan")


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max and sample count: enough to judge how noisy a figure was."""
    if not samples:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": median(samples), "min": float(min(samples)),
            "max": float(max(samples)), "n": len(samples)}


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds ``fn()`` took, after waiting for queued device work (``sync``)."""
    start = clock()
    fn()
    if sync is not None:
        sync()
    return clock() - start


class Stopwatch:
    """Accumulates the time spent in one phase across many short calls.

    ``with watch: ...`` costs two clock reads (~100 ns), negligible next to the
    calls it brackets (an allocation, a batch extend, a free)."""

    __slots__ = ("total", "count", "_start")

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += clock() - self._start
        self.count += 1


class Progress:
    """Progress lines on stderr, so ``--json`` output on stdout stays clean.

    On a terminal the current line is rewritten in place; elsewhere (CI logs,
    pipes) each message is one line.  ``enabled=False`` silences it."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._began = clock()
        self._dirty = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        stamp = f"[{clock() - self._began:6.1f}s] {message}"
        if self._tty:
            self.stream.write("\r\x1b[2K" + stamp)
            self._dirty = True
        else:
            self.stream.write(stamp + "\n")
        self.stream.flush()

    def done(self) -> None:
        """End an in-place line (a terminal only)."""
        if self.enabled and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False
