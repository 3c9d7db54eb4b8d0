"""The SQLite bench's windowed producer keeps its window full and sends each message once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bench import sqlite_e2e
from bench.payload import PUBLISH_WINDOW, TOPIC

from wirework.envelope import WireMessage


class _Gate:
    """A broker whose publishes wait until let through, noting how many wait at once."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.taken: list[WireMessage] = []
        self.most_in_flight = 0

    async def publish(self, topic: str, message: WireMessage) -> None:
        assert topic == TOPIC
        self.taken.append(message)
        done = asyncio.get_running_loop().create_future()
        self.waiting.append(done)
        self.most_in_flight = max(self.most_in_flight, sum(not f.done() for f in self.waiting))
        await done


async def _turns_until(condition: Callable[[], bool], turns: int = 50) -> bool:
    """Let the loop run until ``condition`` holds, at most ``turns`` turns (no clock)."""
    for _ in range(turns):
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


async def test_the_window_stays_full_until_the_messages_run_out() -> None:
    messages = [WireMessage({"n": str(n)}, b"") for n in range(PUBLISH_WINDOW * 3 + 7)]
    broker = _Gate()
    producing = asyncio.create_task(sqlite_e2e.windowed(broker, messages))  # type: ignore[arg-type]

    def open_ones() -> list[asyncio.Future[None]]:
        return [f for f in broker.waiting if not f.done()]

    released = 0
    while len(broker.taken) < len(messages):
        # Never fewer than the window while messages remain, and never more.
        assert await _turns_until(lambda: len(open_ones()) == PUBLISH_WINDOW)
        open_ones()[0].set_result(None)  # the oldest publish returns
        released += 1
    while open_ones():
        open_ones()[0].set_result(None)
        released += 1
        await asyncio.sleep(0)
    await asyncio.wait_for(producing, timeout=5)
    assert broker.most_in_flight == PUBLISH_WINDOW
    assert released == len(messages)
    assert broker.taken == messages  # each once, in order
