"""Driving a ManualClock: run a task to its end by advancing time only when it waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from wirework.clock import ManualClock

T = TypeVar("T")

_SETTLE = 20


async def settle() -> None:
    """Let every ready task run until it waits again (a few loop turns, no time passes)."""
    for _ in range(_SETTLE):
        await asyncio.sleep(0)


async def drive(clock: ManualClock, work: Awaitable[T], *, max_steps: int = 100_000) -> T:
    """Await ``work``, moving ``clock`` to the next sleeper's deadline whenever all wait.

    Fails (instead of hanging) if the work waits on something other than the clock.
    """
    task = asyncio.ensure_future(work)
    try:
        for _ in range(max_steps):
            await settle()
            if task.done():
                return task.result()
            wake = clock.next_deadline()
            assert wake is not None, "stuck: the work waits, but not on the clock"
            await clock.advance(max(0.0, wake - clock.monotonic()))
        raise AssertionError(f"not done after {max_steps} clock steps")
    finally:
        task.cancel()


class RecordingClock(ManualClock):
    """A ManualClock that also records every sleep: (start time, seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[tuple[float, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append((self.monotonic(), seconds))
        await super().sleep(seconds)
