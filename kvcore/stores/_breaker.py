"""A circuit breaker: stop calling a store that keeps failing, try again later.

``closed``: calls go through; ``failure_threshold`` consecutive failures open it.
``open``: calls are refused at once (no timeout paid) for ``cooldown_s`` seconds.
``half_open``: after the cool-down exactly one trial call goes through; success
closes the breaker, failure opens it for another cool-down.  Without this a dead
server would cost every decode step and every allocation a full socket timeout.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable

from ..errors import StoreConfigError

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(str, enum.Enum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    """Thread-safe; ``clock`` is injectable so tests need not sleep."""

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) \
                or failure_threshold < 1:
            raise StoreConfigError(f"failure_threshold must be an int >= 1, got "
                                   f"{failure_threshold!r}")
        if isinstance(cooldown_s, bool) or not isinstance(cooldown_s, (int, float)) \
                or not cooldown_s >= 0:
            raise StoreConfigError(f"cooldown_s must be a number >= 0, got {cooldown_s!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.closed
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False
        self.opens = 0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.open and self._cooled():
                return BreakerState.half_open
            return self._state

    def _cooled(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_s

    def allow(self) -> bool:
        """Whether a call may go out now (the half-open trial counts as one)."""
        with self._lock:
            if self._state is BreakerState.closed:
                return True
            if self._state is BreakerState.open:
                if not self._cooled():
                    return False
                self._state = BreakerState.half_open
                self._trial_out = False
            if self._trial_out:  # half-open: one trial at a time
                return False
            self._trial_out = True
            return True

    def success(self) -> None:
        with self._lock:
            self._state = BreakerState.closed
            self._failures = 0
            self._trial_out = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial_out = False
            if self._state is BreakerState.half_open or self._failures >= self.failure_threshold:
                if self._state is not BreakerState.open:
                    self.opens += 1
                self._state = BreakerState.open
                self._opened_at = self._clock()

    def release(self) -> None:
        """A call that was allowed ended without telling success from failure."""
        with self._lock:
            self._trial_out = False
