"""In-process workloads: producers and one ``Consumer`` sharing one ``SqliteBroker``.

Messages are built before the clock starts; the consumer's decoding and
routing are part of every figure, since ``Consumer`` does them for every user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import floor, probe
from bench.payload import CONCURRENCY, PUBLISH_WINDOW, PUBLISHERS, SUBSCRIPTION, TOPIC, Order
from wirework.brokers.base import Broker, Inspectable
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage

Producer = Callable[[Broker, Sequence[WireMessage]], Awaitable[None]]


async def windowed(broker: Broker, messages: Iterable[WireMessage]) -> None:
    """``PUBLISH_WINDOW`` publishes in flight: as many lanes, each taking the next message.

    Every lane awaits its publish, then takes the next message from one shared
    iterator, so the broker always has ``PUBLISH_WINDOW`` publishes outstanding,
    taken in the messages' order. Why lanes and not a task a publish under a
    semaphore: the floor has no event loop, so whatever the producer costs the
    loop is charged to wirework. A task a publish cost 69,898 instructions a
    message of asyncio's task machinery (creating the task, two done-callbacks,
    waking the semaphore's waiter), a third of the loop's count; lanes cost 13,030
    (``python -m bench.instructions``, its producer side, 2026-11-27).
    """
    remaining = iter(messages)

    async def lane() -> None:
        for message in remaining:
            await broker.publish(TOPIC, message)

    async with asyncio.TaskGroup() as tasks:
        for _ in range(PUBLISH_WINDOW):
            tasks.create_task(lane())


async def serial(broker: Broker, messages: Iterable[WireMessage]) -> None:
    """One task awaiting each publish before the next."""
    for message in messages:
        await broker.publish(TOPIC, message)


async def concurrent_publishers(broker: Broker, messages: Sequence[WireMessage]) -> None:
    """``PUBLISHERS`` tasks, each awaiting each of its publishes before the next."""
    async with asyncio.TaskGroup() as tasks:
        for first in range(PUBLISHERS):
            tasks.create_task(serial(broker, messages[first::PUBLISHERS]))


@dataclass
class Throughput:
    messages: int
    seconds: float
    """From the first publish to the last ack."""
    publish_seconds: float
    """From the first publish to the last publish returning."""
    transactions: probe.Transactions
    cpu: probe.ThreadCpu
    ran: list[floor.Replayed]
    """The writer's transactions of the run, as ``bench.floor.replay`` runs them again."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def publish_rate(self) -> float:
        return self.messages / self.publish_seconds


class Tally:
    """A trivial handler that counts, and says when it has seen them all."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.all_seen = asyncio.Event()

    async def handle(self, order: Order, envelope: Envelope) -> None:
        self.seen += 1
        if self.seen >= self.expected:
            self.all_seen.set()


async def wait_for_group(broker: Inspectable) -> None:
    """Until the benchmark's group exists, so nothing published is missed by the timing."""
    while not any(row.group == SUBSCRIPTION.group for row in await broker.stats()):
        await asyncio.sleep(0.01)


def open_broker(path: Path, durability: str) -> SqliteBroker:
    return SqliteBroker(path, settings=SqliteSettings(durability=durability))  # type: ignore[arg-type]


async def throughput(
    path: Path, *, durability: str, messages: Sequence[WireMessage], producer: Producer
) -> Throughput:
    """Publish ``messages`` with ``producer`` while one Consumer handles and acks them."""
    tally = Tally(len(messages))
    async with open_broker(path, durability) as broker:
        consumer = Consumer(
            broker,
            SUBSCRIPTION,
            routes=[Route(None, Order, tally.handle)],
            concurrency=CONCURRENCY,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consumer.run())
            await wait_for_group(broker)
            transactions = probe.Transactions.of(broker)
            cpu = probe.thread_cpu()
            recorded = broker.record_transactions()
            started = time.perf_counter()
            await producer(broker, messages)
            published = time.perf_counter()
            await tally.all_seen.wait()
            while consumer.stats.handled < len(messages):  # the last acks are on their way
                await asyncio.sleep(0.0005)
            finished = time.perf_counter()
            ran = floor.recorded(broker, recorded[:])
            result = Throughput(
                messages=len(messages),
                seconds=finished - started,
                publish_seconds=published - started,
                transactions=probe.Transactions.of(broker) - transactions,
                cpu=probe.thread_cpu() - cpu,
                ran=ran,
            )
            await consumer.stop()
    return result


async def latency(
    path: Path, *, durability: str, messages: Sequence[WireMessage], gap: float
) -> list[float]:
    """Seconds from ``publish`` to the handler, one message at a time, ``gap`` idle between."""
    seen: dict[str, asyncio.Future[float]] = {}

    async def handle(order: Order, envelope: Envelope) -> None:
        seen[envelope.id].set_result(time.perf_counter())

    taken: list[float] = []
    async with open_broker(path, durability) as broker:
        consumer = Consumer(
            broker, SUBSCRIPTION, routes=[Route(None, Order, handle)], concurrency=CONCURRENCY
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consumer.run())
            await wait_for_group(broker)
            loop = asyncio.get_running_loop()
            for message in messages:
                await asyncio.sleep(gap)
                arrived = seen[str(message.message_id)] = loop.create_future()
                started = time.perf_counter()
                await broker.publish(TOPIC, message)
                taken.append(await asyncio.wait_for(arrived, timeout=10) - started)
            await consumer.stop()
    return taken
