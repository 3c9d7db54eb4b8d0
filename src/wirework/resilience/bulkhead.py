"""``Bulkhead``: at most so many calls in flight to a target, and a bounded queue for the rest.

It keeps one slow target from taking every connection, task and socket of
the process (the compartments of a ship's hull). Past both limits a call is
rejected at once with ``BulkheadFullError``: an unbounded queue would only
turn overload into latency and memory. A slot is freed however the call
ends (success, error or cancellation), and a caller cancelled while it
waits (its deadline passed) leaves the queue, or hands on a slot it was
given at that very moment.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from wirework.errors import BulkheadFullError
from wirework.resilience.settings import BulkheadSettings

T = TypeVar("T")


@dataclass
class BulkheadStats:
    """Counts since start: calls let through (``admitted``), made to wait, and rejected."""

    admitted: int = 0
    waited: int = 0
    rejected: int = 0


class Bulkhead:
    """Limit the calls in flight to ``max_concurrent``, queueing up to ``max_queued`` more.

    Args:
        settings: the two limits (defaults if None).
        name: the target, for error messages.
    """

    def __init__(self, settings: BulkheadSettings | None = None, *, name: str = "") -> None:
        self.settings = settings or BulkheadSettings()
        self.name = name
        self.stats = BulkheadStats()
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        limits = self.settings
        return f"Bulkhead(max_concurrent={limits.max_concurrent}, max_queued={limits.max_queued})"

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()`` once a slot is free.

        Raises:
            BulkheadFullError: every slot is taken and the queue is full; ``fn``
                was not called.
        """
        await self._acquire()
        try:
            return await fn()
        finally:
            self._release()

    async def _acquire(self) -> None:
        limits = self.settings
        if self._active < limits.max_concurrent and not self._waiters:
            self._active += 1
            self.stats.admitted += 1
            return
        if len(self._waiters) >= limits.max_queued:
            self.stats.rejected += 1
            on = f"bulkhead {self.name!r}" if self.name else "the bulkhead"
            raise BulkheadFullError(
                f"{on} is full: {self._active} calls in flight (max_concurrent="
                f"{limits.max_concurrent}) and {len(self._waiters)} waiting (max_queued="
                f"{limits.max_queued}); the target is slower than the call rate, so shed "
                f"load, or raise the limits if the target can take more"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.stats.waited += 1
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        self.stats.admitted += 1

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: _active is unchanged
                return
        self._active -= 1
