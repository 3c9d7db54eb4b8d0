"""The bulkhead: a concurrency limit with a bounded queue, whose slots always come back."""

from __future__ import annotations

import asyncio

import pytest

from wirework.errors import BulkheadFullError
from wirework.resilience import Bulkhead, BulkheadSettings

from .driving import settle


class Holder:
    """Calls that stay in flight until the test lets each one go."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.ran: list[str] = []

    def call(self, name: str, *, fail: bool = False) -> asyncio.Future[str]:
        gate = self.gates[name] = asyncio.Event()

        async def work() -> str:
            self.ran.append(name)
            await gate.wait()
            if fail:
                raise RuntimeError(f"{name} failed")
            return name

        return asyncio.ensure_future(self.bulkhead.call(work))

    bulkhead: Bulkhead


def holding(max_concurrent: int, max_queued: int) -> Holder:
    holder = Holder()
    holder.bulkhead = Bulkhead(
        BulkheadSettings(max_concurrent=max_concurrent, max_queued=max_queued), name="stock"
    )
    return holder


async def test_rejects_at_once_over_both_limits() -> None:
    """2 in flight, 1 queued: the fourth call is rejected without waiting or running."""
    holder = holding(2, 1)
    a, b, c = holder.call("a"), holder.call("b"), holder.call("c")
    await settle()
    assert (holder.bulkhead.active, holder.bulkhead.queued) == (2, 1)

    with pytest.raises(BulkheadFullError, match="bulkhead 'stock' is full"):
        await holder.bulkhead.call(asyncio.Event().wait)
    assert holder.ran == ["a", "b"]

    holder.gates["a"].set()
    assert await a == "a"
    await settle()
    assert holder.ran == ["a", "b", "c"]  # the queued call took a's slot
    holder.gates["b"].set()
    holder.gates["c"].set()
    assert list(await asyncio.gather(b, c)) == ["b", "c"]
    assert (holder.bulkhead.active, holder.bulkhead.queued) == (0, 0)
    stats = holder.bulkhead.stats
    assert (stats.admitted, stats.waited, stats.rejected) == (3, 1, 1)


async def test_a_call_that_fails_frees_its_slot() -> None:
    """An error in the call gives its slot back, to a waiter or to the pool."""
    holder = holding(1, 1)
    failing = holder.call("a", fail=True)
    waiting = holder.call("b")
    await settle()

    holder.gates["a"].set()
    with pytest.raises(RuntimeError):
        await failing
    await settle()
    assert holder.ran == ["a", "b"]
    holder.gates["b"].set()
    await waiting
    assert holder.bulkhead.active == 0


async def test_cancelled_calls_free_their_slot_or_their_place_in_the_queue() -> None:
    """Cancelling a running call frees its slot; cancelling a queued one frees its place."""
    holder = holding(1, 2)
    running, queued, last = holder.call("a"), holder.call("b"), holder.call("c")
    await settle()
    assert (holder.bulkhead.active, holder.bulkhead.queued) == (1, 2)

    queued.cancel()
    await settle()
    assert holder.bulkhead.queued == 1
    running.cancel()
    await settle()

    assert holder.ran == ["a", "c"]  # b left the queue without running
    assert (holder.bulkhead.active, holder.bulkhead.queued) == (1, 0)
    holder.gates["c"].set()
    assert await last == "c"
    assert holder.bulkhead.active == 0


async def test_a_slot_handed_to_a_caller_cancelled_at_that_moment_is_passed_on() -> None:
    """The waiter given the slot is cancelled before it runs: the next waiter gets the slot."""
    holder = holding(1, 2)
    gate = asyncio.Event()

    async def first_call() -> None:
        await gate.wait()

    async def first_then_cancel_second() -> None:
        await holder.bulkhead.call(first_call)
        # Same loop step as the release that handed the slot to b: b has not run yet.
        second.cancel()

    first = asyncio.ensure_future(first_then_cancel_second())
    await settle()
    second, third = holder.call("b"), holder.call("c")
    await settle()

    gate.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    await settle()

    assert holder.ran == ["c"]
    holder.gates["c"].set()
    assert await third == "c"
    assert (holder.bulkhead.active, holder.bulkhead.queued) == (0, 0)


async def test_no_queue_means_reject_as_soon_as_every_slot_is_taken() -> None:
    """max_queued 0: the call after max_concurrent is refused at once."""
    holder = holding(1, 0)
    running = holder.call("a")
    await settle()

    with pytest.raises(BulkheadFullError):
        await holder.bulkhead.call(asyncio.Event().wait)

    holder.gates["a"].set()
    await running
