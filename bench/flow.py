"""What the Service, request-reply and server-backend workloads share, whoever does the work.

A *side* is one way of doing publish -> consume -> ack (wirework, a broker's raw
client, FastStream); a *call* is one request-reply round trip. Both are timed
here the same way for every side, so the figures differ only in who did the work.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from bench.idle import percentile
from bench.payload import PUBLISH_WINDOW
from wirework.envelope import WireMessage

Send = Callable[[WireMessage], Coroutine[Any, Any, object]]
Producer = Callable[[Send, Sequence[WireMessage]], Awaitable[None]]

#: Requests outstanding at once in the concurrent request-reply cases.
IN_FLIGHT = 64

#: The subject (wirework topic) requests go to.
SUBJECT = "bench.ask"


class Ask(BaseModel):
    """A request: small, as a typical RPC's is (a few dozen bytes of JSON)."""

    n: int
    note: str = "how much stock is left?"


class Answer(BaseModel):
    n: int
    left: int = 42


async def serial(send: Send, messages: Iterable[WireMessage]) -> None:
    """One task awaiting each publish before the next."""
    for message in messages:
        await send(message)


async def windowed(send: Send, messages: Iterable[WireMessage]) -> None:
    """One task keeping ``PUBLISH_WINDOW`` publishes in flight."""
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    async with asyncio.TaskGroup() as tasks:
        for message in messages:
            await window.acquire()
            task = tasks.create_task(send(message))
            task.add_done_callback(lambda _: window.release())


#: Producer shapes by the name printed in figure titles.
PRODUCERS: dict[str, Producer] = {"serial": serial, "window 100": windowed}


class Counter:
    """Messages handled (and acked) so far; says when all expected ones were."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self._all = asyncio.Event()
        self._failed: BaseException | None = None

    def add(self) -> None:
        self.seen += 1
        if self.seen >= self.expected:
            self._all.set()

    def fail(self, exc: BaseException) -> None:
        """A consumer died: waiting ends with its error instead of a timeout."""
        self._failed = exc
        self._all.set()

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Fail the count if ``task`` (a consumer, a reader) ends with an error."""

        def ended(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.fail(exc)

        task.add_done_callback(ended)

    async def wait(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._all.wait()
        except TimeoutError:
            raise RuntimeError(
                f"only {self.seen:,} of {self.expected:,} messages handled in {timeout:.0f} s"
            ) from None
        if self._failed is not None:
            raise RuntimeError(f"the consumer failed: {self._failed!r}") from self._failed


class Side(Protocol):
    """One way of doing publish -> consume -> ack, on one fresh topic or queue."""

    async def start(self, counter: Counter) -> None:
        """Declare what it needs and start consuming; return once the consumer is attached."""
        ...

    async def send(self, message: WireMessage) -> None:
        """Publish one message; return once the broker holds it."""
        ...

    async def settled(self) -> None:
        """Return once the last handled message's ack is done (the counter may run ahead)."""
        ...

    async def aclose(self) -> None:
        """Stop consuming, delete what ``start`` declared, close connections."""
        ...


@dataclass(frozen=True)
class Throughput:
    messages: int
    seconds: float
    """From the first publish to the last ack."""
    publish_seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def patience(messages: int) -> float:
    """Seconds to wait for a run's messages before calling it stuck."""
    return 120.0 + messages / 100


async def throughput(side: Side, messages: Sequence[WireMessage], producer: Producer) -> Throughput:
    """Publish ``messages`` with ``producer`` while the side consumes and acks them."""
    counter = Counter(len(messages))
    try:
        await side.start(counter)
        started = time.perf_counter()
        await producer(side.send, messages)
        published = time.perf_counter()
        await counter.wait(patience(len(messages)))
        await side.settled()
        finished = time.perf_counter()
    finally:
        await side.aclose()
    return Throughput(len(messages), finished - started, published - started)


Call = Callable[[int], Awaitable[None]]
"""One request-reply round trip for request number ``n``; raises if the answer is wrong."""


@dataclass(frozen=True)
class RoundTrips:
    """Seconds each request took, and (concurrent cases) the wall time of them all."""

    samples: list[float]
    seconds: float

    @property
    def p50(self) -> float:
        return percentile(self.samples, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds


async def one_by_one(call: Call, count: int) -> RoundTrips:
    """``count`` requests, each sent once the previous one's reply is in."""
    for n in range(-5, 0):  # warm-up: connections, lazily declared objects
        await call(n)
    samples = []
    started = time.perf_counter()
    for n in range(count):
        begun = time.perf_counter()
        await call(n)
        samples.append(time.perf_counter() - begun)
    return RoundTrips(samples, time.perf_counter() - started)


async def in_flight(call: Call, count: int, width: int = IN_FLIGHT) -> RoundTrips:
    """``count`` requests from ``width`` tasks, each sending its next once answered."""
    samples: list[float] = []
    numbers = iter(range(count))

    async def caller() -> None:
        for n in numbers:
            begun = time.perf_counter()
            await call(n)
            samples.append(time.perf_counter() - begun)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(width):
            tasks.create_task(caller())
    return RoundTrips(samples, time.perf_counter() - started)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
