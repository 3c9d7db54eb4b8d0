"""Workload 7: what ``Service`` costs on top of the ``Consumer`` it is built on.

The same backlog is drained twice per round: once by a ``Service`` with one
``@svc.consume`` handler (typed body, nothing else), once by a bare
``wirework.consumer.Consumer`` with a route to the same kind of handler, both
with concurrency 8 and prefetch 32 on the same broker. Rounds alternate the
two, and the median of each side is compared.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar

from bench.flow import Counter, median, patience, windowed
from bench.payload import CONCURRENCY, EVENT_TYPE, PREFETCH, Order, make_messages
from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from wirework.brokers import connect
from wirework.brokers.base import Broker, GroupAdmin, Subscription
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage
from wirework.service import Service

#: Service throughput must reach this share of the raw Consumer's.
MIN_RAW_RATIO = 0.85

#: ``@svc.consume(QUEUE)`` reads the topic QUEUE as the group QUEUE; the Consumer does too.
QUEUE = "bench.commands"

#: Drains per side; the median one is reported.
ROUNDS = 5


class PlaceOrder(Order):
    """The benchmark's body model, named with the messages' event type for the Service's route."""

    __event_type__: ClassVar[str] = EVENT_TYPE


SUBSCRIPTION = Subscription(topic=QUEUE, group=QUEUE, prefetch=PREFETCH)

Drain = Callable[[Broker, int], Awaitable[float]]


async def drain_with_consumer(broker: Broker, count: int) -> float:
    """Seconds a bare ``Consumer`` takes to handle and ack ``count`` waiting messages."""
    counter = Counter(count)

    async def handle(order: Order, envelope: Envelope) -> None:
        counter.add()

    consumer = Consumer(
        broker, SUBSCRIPTION, routes=[Route(EVENT_TYPE, Order, handle)], concurrency=CONCURRENCY
    )
    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await counter.wait(patience(count))
        while consumer.stats.handled < count:  # the last acks are on their way
            await asyncio.sleep(0.0005)
        seconds = time.perf_counter() - started
        await consumer.stop()
    return seconds


async def drain_with_service(broker: Broker, count: int) -> float:
    """Seconds a ``Service`` with one ``@svc.consume`` handler takes for the same."""
    counter = Counter(count)
    service = Service("bench-service", broker=broker)

    @service.consume(QUEUE, concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def place(order: PlaceOrder) -> None:
        counter.add()

    started = time.perf_counter()
    async with service:
        await counter.wait(patience(count))
        while service.bindings[0].stats.handled < count:
            await asyncio.sleep(0.0005)
        return time.perf_counter() - started


async def fill(broker: Broker, messages: Sequence[WireMessage]) -> None:
    """The backlog: the group declared, then every message published (not timed)."""
    if not isinstance(broker, GroupAdmin):
        raise TypeError(f"{type(broker).__name__} cannot declare groups")
    await broker.declare_group(SUBSCRIPTION)
    await windowed(lambda message: broker.publish(QUEUE, message), messages)


async def on_memory(messages: Sequence[WireMessage], drain: Drain) -> float:
    async with connect("memory://") as broker:
        await fill(broker, messages)
        return len(messages) / await drain(broker, len(messages))


async def on_sqlite(template: Path, run: Path, count: int, drain: Drain) -> float:
    shutil.copyfile(template, run)
    async with connect(f"sqlite:///{run}?durability=fast") as broker:
        return count / await drain(broker, count)


async def make_template(path: Path, messages: Sequence[WireMessage]) -> None:
    """A SQLite file holding the backlog, copied before each drain (closed: WAL checkpointed)."""
    async with connect(f"sqlite:///{path}?durability=fast") as broker:
        await fill(broker, messages)


def overhead(sizes: Sizes) -> list[Figure]:
    """Workload 7: memory:// and SQLite (fast), Service vs raw Consumer, alternating."""
    messages = make_messages(sizes.service_messages)
    rounds = max(ROUNDS, sizes.repeat)
    figures = []
    with scratch() as tmp:
        template = Path(tmp) / "backlog.db"
        asyncio.run(make_template(template, messages))
        cases: list[tuple[str, Callable[[Drain], float]]] = [
            ("memory://", lambda drain: asyncio.run(on_memory(messages, drain))),
            (
                "sqlite (fast)",
                lambda drain: asyncio.run(
                    on_sqlite(template, Path(tmp) / "run.db", len(messages), drain)
                ),
            ),
        ]
        for key, (label, measure) in zip(("7a", "7b"), cases, strict=True):
            raw: list[float] = []
            service: list[float] = []
            for _ in range(rounds):
                raw.append(measure(drain_with_consumer))
                service.append(measure(drain_with_service))
            runs = ", ".join(f"{s:,.0f}/{r:,.0f}" for s, r in zip(service, raw, strict=True))
            figures.append(
                Figure(
                    key,
                    f"{label}, drain {len(messages):,} msgs: Service",
                    median(service),
                    "msg/s",
                    floor=median(raw),
                    floor_name="raw",
                    min_ratio=MIN_RAW_RATIO,
                    notes=[f"median of {rounds} alternating rounds (Service/raw msg/s: {runs})"],
                )
            )
            progress(figures[-1])
    figures[0].notes = [*describe(sizes), *figures[0].notes]
    return figures


def describe(sizes: Sizes) -> list[str]:
    return [
        f"Service overhead: a backlog of {sizes.service_messages:,} messages (1 KiB CloudEvents) "
        f"waiting in the group, drained by a Service with one @svc.consume(concurrency "
        f"{CONCURRENCY}, prefetch {PREFETCH}) handler `async def place(order: PlaceOrder)` "
        f"(raw: a Consumer with the same concurrency, prefetch and a Route to a handler that "
        f"only counts); time from start()/run() to the last ack; SQLite in fast durability, so "
        f"the disk does not hide Python costs; the backlog file is copied before each drain",
    ]
