"""The retry budget: retries to a target may add only so much to its request rate.

A per-call attempt limit does not bound load: with 3 attempts, an upstream
that fails every call gets 3x its traffic exactly when it can least take it.
The budget bounds retries across all calls to a target (RELIABILITY.md
lesson 7), as Linkerd and Finagle do: over a sliding window of ``window``
seconds, retries may number at most ``ratio`` times the calls plus
``min_per_second * window`` (a reserve, so a quiet target can still retry).
Linkerd's default is 20 % plus 10 retries/s over 10 s.

Time is passed in (``now``, seconds on a monotonic clock): no I/O, no sleep.
"""

from __future__ import annotations

import math

from wirework.errors import ConfigurationError

# The window is kept as this many slots; it then covers between 9/10 and all
# of ``window`` seconds, and memory stays constant whatever the request rate.
_SLOTS = 10
# Float sums such as 0.2 * 1000 must not lose a retry to rounding.
_EPSILON = 1e-9


class RetryBudget:
    """Counts calls and retries in a sliding window and says whether one more retry fits.

    Args:
        ratio: retries allowed per call in the window (0.2: 20 % extra load).
        min_per_second: retries per second allowed even with no calls.
        window: the window's length in seconds.

    Raises:
        ConfigurationError: a negative ratio or rate, or a window that is not positive.
    """

    def __init__(
        self, *, ratio: float = 0.2, min_per_second: float = 10.0, window: float = 10.0
    ) -> None:
        if not (ratio >= 0 and min_per_second >= 0 and math.isfinite(window) and window > 0):
            raise ConfigurationError(
                f"RetryBudget(ratio={ratio!r}, min_per_second={min_per_second!r}, "
                f"window={window!r}): ratio and min_per_second must be >= 0 and window > 0 seconds"
            )
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._width = window / _SLOTS
        self._slot_ids = [-1] * _SLOTS
        self._calls = [0] * _SLOTS
        self._retries = [0] * _SLOTS

    def record_call(self, now: float) -> None:
        """Count one call (its first attempt) at ``now``."""
        self._calls[self._slot(now)] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if it fits; False (and nothing taken) if not."""
        if self.available(now) < 1 - _EPSILON:
            return False
        self._retries[self._slot(now)] += 1
        return True

    def available(self, now: float) -> float:
        """How many more retries fit in the window ending at ``now``."""
        calls, retries = self._totals(now)
        return self.min_per_second * self.window + self.ratio * calls - retries

    def _slot(self, now: float) -> int:
        slot_id = math.floor(now / self._width)
        index = slot_id % _SLOTS
        if self._slot_ids[index] != slot_id:
            self._slot_ids[index] = slot_id
            self._calls[index] = 0
            self._retries[index] = 0
        return index

    def _totals(self, now: float) -> tuple[int, int]:
        newest = math.floor(now / self._width)
        calls = retries = 0
        for index, slot_id in enumerate(self._slot_ids):
            if newest - _SLOTS < slot_id <= newest:
                calls += self._calls[index]
                retries += self._retries[index]
        return calls, retries
