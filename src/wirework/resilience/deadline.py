"""The deadline of the current call, carried in a contextvar, and ``Timeout`` that sets it.

A deadline is a point on a clock's monotonic time, so a wall-clock jump
neither cuts a call early nor lets it run on (RELIABILITY.md DEV-19). It is
inherited down the call chain through a ``ContextVar``: everything awaited
inside ``Timeout(2).call(fn)`` (retries, the next hop's client, a nested
``Timeout``) sees the same ``current_deadline()``, and a nested deadline can
only tighten it, never extend it. The wire formats live in ``carriers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from wirework.clock import SYSTEM_CLOCK, Clock, SystemClock
from wirework.errors import ConfigurationError, DeadlineExceededError

T = TypeVar("T")

_current: ContextVar[Deadline | None] = ContextVar("wirework_deadline", default=None)


@dataclass(frozen=True)
class Deadline:
    """A moment on ``clock.monotonic()`` by which the call must be over.

    Attributes:
        at: the moment, in seconds of ``clock.monotonic()``.
        clock: the clock ``at`` is measured on (a ``ManualClock`` in tests).
        source: who set it, for error messages (``"Timeout(2s) on 'payments'"``).
    """

    at: float
    clock: Clock
    source: str = ""

    @classmethod
    def after(cls, seconds: float, *, clock: Clock = SYSTEM_CLOCK, source: str = "") -> Deadline:
        """The deadline ``seconds`` from now on ``clock``."""
        return cls(clock.monotonic() + seconds, clock, source)

    def remaining(self) -> float:
        """Seconds left; zero or negative once it has passed."""
        return self.at - self.clock.monotonic()

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.remaining() <= 0


def current_deadline() -> Deadline | None:
    """The deadline of the call being run, or None if nothing set one."""
    return _current.get()


def tighter(first: Deadline | None, second: Deadline | None) -> Deadline | None:
    """The earlier of two deadlines (None is no deadline: the other one wins)."""
    if first is None:
        return second
    if second is None:
        return first
    # Compared by what remains, so deadlines on different clocks compare sanely.
    return first if first.remaining() <= second.remaining() else second


@contextlib.contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Make ``deadline`` current inside the block, if it is tighter than the current one.

    For bindings that receive a deadline over the wire (``carriers``): the
    handler then sees it in ``current_deadline()`` and every outgoing call it
    makes through a ``Timeout`` or ``Retry`` honours it. This only records
    the deadline; ``run_within`` (or a ``Timeout``) is what cuts a call at it.

    Yields:
        The deadline now current (None if there is none).
    """
    effective = tighter(_current.get(), deadline)
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)


async def run_within(deadline: Deadline, fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()`` with ``deadline`` current, cutting it at the deadline.

    ``fn`` runs in the caller's task (so its context changes stay visible),
    cancelled by asyncio's own ``timeout`` machinery. On the system clock the
    loop timer fires it; on any other clock a watcher sleeping on that clock
    does, so a ``ManualClock`` cuts the call when a test advances past it.

    Raises:
        DeadlineExceededError: the deadline passed before or during the call;
            ``fn`` is not started if it had passed already.
    """
    remaining = deadline.remaining()
    if remaining <= 0:
        raise DeadlineExceededError(_passed_message(deadline, started=False))
    token = _current.set(deadline)
    watcher: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(None) as scope:
            loop = asyncio.get_running_loop()
            if isinstance(deadline.clock, SystemClock):
                # Real time: the loop's own timer can carry it (one handle, no task).
                scope.reschedule(loop.time() + remaining)
            else:
                watcher = asyncio.ensure_future(_expire(scope, deadline.clock, remaining))
            return await fn()
    except TimeoutError as exc:
        if scope.expired():
            raise DeadlineExceededError(_passed_message(deadline, started=True)) from exc
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        _current.reset(token)


async def _expire(scope: asyncio.Timeout, clock: Clock, seconds: float) -> None:
    await clock.sleep(seconds)
    scope.reschedule(asyncio.get_running_loop().time())


def _passed_message(deadline: Deadline, *, started: bool) -> str:
    set_by = f" set by {deadline.source}" if deadline.source else ""
    if started:
        return (
            f"the call was cut at its deadline{set_by}; raise the timeout if the upstream "
            f"is expected to take longer, or find out why it is slow"
        )
    return (
        f"the deadline{set_by} had already passed, so the call was not started; "
        f"the caller's own deadline leaves no time for it"
    )


class Timeout:
    """Give a call at most ``seconds``, or less if an inherited deadline is tighter.

    Outermost in a ``Pipeline``, it bounds the whole call: every attempt and
    every backoff sleep of a ``Retry`` inside it.

    Args:
        seconds: the budget for the whole call; positive and finite.
        clock: where the time is read.
        name: the target, for error messages.

    Raises:
        ConfigurationError: ``seconds`` is not a positive finite number.
    """

    def __init__(self, seconds: float, *, clock: Clock = SYSTEM_CLOCK, name: str = "") -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigurationError(
                f"Timeout({seconds!r}): the timeout must be a positive number of seconds; "
                f"every call needs one (there is no infinite default)"
            )
        self.seconds = seconds
        self.clock = clock
        self.name = name

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g})"

    def deadline(self) -> Deadline:
        """The deadline a call started now would get: ours, or the inherited one if tighter."""
        on = f" on {self.name!r}" if self.name else ""
        own = Deadline.after(
            self.seconds, clock=self.clock, source=f"Timeout({self.seconds:g}s){on}"
        )
        inherited = _current.get()
        if inherited is not None and inherited.remaining() <= own.remaining():
            return inherited
        return own

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()`` under this timeout (``idempotent``/``idempotency_key`` are unused).

        Raises:
            DeadlineExceededError: the deadline passed before or during the call.
        """
        return await run_within(self.deadline(), fn)
