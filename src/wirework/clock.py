"""Time as a dependency, so leases, backoff and deadlines can be tested without sleeping.

Durations (leases, backoff, deadlines) use ``monotonic()`` so a wall-clock jump
neither fires nor stalls timers; ``now()`` is only for timestamps people read.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What wirework needs from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; only differences mean anything."""
        ...

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the caller for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


SYSTEM_CLOCK = SystemClock()


async def wait_first(*events: asyncio.Event, clock: Clock, pause: float | None) -> None:
    """Return when any of ``events`` is set or ``pause`` seconds pass on ``clock``.

    The clock's own sleep is raced against the events (not a loop timeout), so
    a ``ManualClock`` wakes the waiter when a test advances it. Every wait
    belongs to this call and is cancelled before it returns. Not a
    ``TaskGroup``: on Python 3.11 one whose child ends in the same step as the
    caller is cancelled swallows that cancellation.
    """
    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(event.wait()) for event in events}
    if pause is not None:
        waits.add(asyncio.ensure_future(clock.sleep(pause)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


class ManualClock:
    """A clock that moves only when told to, for tests of retries and leases.

    Sleepers wake, in deadline order, when ``advance`` passes their deadline.
    The wall clock can be jumped independently (``jump_wall``) to check that
    no duration depends on it.
    """

    def __init__(self, *, start: datetime | None = None) -> None:
        self._mono = 0.0
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move both clocks forward, waking every sleeper whose deadline passes."""
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            step = deadline - self._mono
            self._mono = deadline
            self._wall += timedelta(seconds=step)
            if not future.done():
                future.set_result(None)
            # Let the woken task run (and perhaps sleep again) before moving on.
            for _ in range(5):
                await asyncio.sleep(0)
        self._wall += timedelta(seconds=target - self._mono)
        self._mono = target
        for _ in range(5):
            await asyncio.sleep(0)

    def next_deadline(self) -> float | None:
        """The monotonic time the earliest waiting sleeper wakes at, or None if none waits."""
        pending = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(pending, default=None)

    def jump_wall(self, seconds: float) -> None:
        """Jump the wall clock only (NTP step, DST bug); monotonic time is untouched."""
        self._wall += timedelta(seconds=seconds)
