"""A consumer outlives transient broker faults, and stops on permanent ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest
from pydantic import BaseModel

from wirework.brokers.base import Broker, Delivery, Subscription
from wirework.brokers.memory import MemoryBroker
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import BrokerClosedError, BrokerError, BrokerUnavailableError
from wirework.testing.conformance import wait_until


class Item(BaseModel):
    n: int


class FlakySubscriptions(Broker):
    """Wraps a real broker; the first ``failures`` subscriptions die after one delivery."""

    def __init__(self, inner: MemoryBroker, failures: int, error: BrokerError) -> None:
        self.inner = inner
        self.failures = failures
        self.error = error
        self.subscriptions = 0

    async def publish(
        self, topic: str, message: WireMessage, *, key: str | None = None, delay: float = 0.0
    ) -> None:
        await self.inner.publish(topic, message, key=key, delay=delay)

    async def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        self.subscriptions += 1
        doomed = self.subscriptions <= self.failures
        async with contextlib.aclosing(self.inner.subscribe(subscription)) as deliveries:
            async for delivery in deliveries:
                yield delivery
                if doomed:
                    raise self.error

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_consumer_resubscribes_after_a_retriable_error() -> None:
    """Two subscriptions die with BrokerUnavailableError; every message is still handled."""
    broker = FlakySubscriptions(MemoryBroker(), 2, BrokerUnavailableError("connection reset"))
    handled: list[int] = []

    async def handle(item: Item, envelope: Envelope) -> None:
        handled.append(item.n)

    consumer = Consumer(
        broker, Subscription(topic="t", group="g"), routes=[Route("Item", Item, handle)]
    )
    for n in range(10):
        await broker.publish("t", encode_binary(Envelope.new("Item", Item(n=n), source="/t")))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await wait_until(lambda: sorted(set(handled)) == list(range(10)), what="all handled")
        await consumer.stop(grace=1)
    assert broker.subscriptions == 3


async def test_consumer_stops_on_a_permanent_error() -> None:
    """A non-retriable broker error (closed broker) ends run() with that error, not a loop."""
    broker = FlakySubscriptions(MemoryBroker(), 1, BrokerClosedError("closed under us"))

    async def handle(item: Item, envelope: Envelope) -> None:
        return None

    consumer = Consumer(
        broker, Subscription(topic="t", group="g"), routes=[Route("Item", Item, handle)]
    )
    await broker.publish("t", encode_binary(Envelope.new("Item", Item(n=1), source="/t")))
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(consumer.run(), 5)
    assert info.group_contains(BrokerClosedError)
    assert broker.subscriptions == 1
