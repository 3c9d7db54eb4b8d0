"""The Consumer takes the next message while an ack is on its way, and keeps the ack's promise."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from pydantic import BaseModel

from tests.helpers.recording import WrappedDelivery
from wirework.brokers.base import Broker, DeadLetterReason, Delivery, Failure, Subscription
from wirework.brokers.memory import MemoryBroker
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import BrokerUnavailableError
from wirework.testing.conformance import wait_until


class Item(BaseModel):
    n: int


class HeldAcks(Broker):
    """A memory broker whose acks, begun with ``start_ack``, end only when the test says."""

    def __init__(self) -> None:
        self.inner = MemoryBroker()
        self.acking: list[tuple[HeldDelivery, asyncio.Future[None]]] = []

    async def publish(
        self, topic: str, message: WireMessage, *, key: str | None = None, delay: float = 0.0
    ) -> None:
        await self.inner.publish(topic, message, key=key, delay=delay)

    async def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        async with contextlib.aclosing(self.inner.subscribe(subscription)) as deliveries:
            async for delivery in deliveries:
                yield HeldDelivery(self, delivery)

    async def answer(self, *, fail: bool = False) -> None:
        """Answer the oldest ack on its way: held, or an error (as a lost answer would be)."""
        delivery, acking = self.acking.pop(0)
        assert delivery.inner_ack is not None
        await delivery.inner_ack
        if fail:
            acking.set_exception(BrokerUnavailableError("connection reset before the answer"))
        else:
            acking.set_result(None)

    async def aclose(self) -> None:
        await self.inner.aclose()


class HeldDelivery(WrappedDelivery):
    def __init__(self, broker: HeldAcks, inner: Delivery) -> None:
        super().__init__(inner)
        self.broker = broker
        self.inner = inner
        self.inner_ack: asyncio.Future[None] | None = None

    def start_ack(self) -> asyncio.Future[None]:
        # Settled at once, as a backend's start_ack does; only the answer is held back.
        self.inner_ack = asyncio.ensure_future(self.inner.ack())
        acking: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.broker.acking.append((self, acking))
        return acking

    async def ack(self) -> None:
        await self.inner.ack()

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        await self.inner.nack(delay=delay, error=error)

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        await self.inner.dead_letter(reason, error)


SUBSCRIPTION = Subscription(topic="t", group="g", prefetch=8)


async def publish(broker: Broker, *numbers: int) -> None:
    for n in numbers:
        await broker.publish("t", encode_binary(Envelope.new("Item", Item(n=n), source="/t")))


def consumer_of(broker: Broker, seen: list[int]) -> Consumer:
    async def handle(item: Item, envelope: Envelope) -> None:
        seen.append(item.n)

    return Consumer(broker, SUBSCRIPTION, routes=[Route("Item", Item, handle)], concurrency=1)


async def test_one_handler_takes_the_next_message_while_acks_are_on_their_way() -> None:
    """Handled counts only answered acks; the handler does not wait for them."""
    broker = HeldAcks()
    seen: list[int] = []
    consumer = consumer_of(broker, seen)
    await publish(broker, 1, 2, 3)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await wait_until(lambda: len(seen) == 3, what="three handled, no ack answered")
        assert len(broker.acking) == 3
        assert consumer.stats.handled == 0, "counted before the broker held the ack"
        for _ in range(3):
            await broker.answer()
        await wait_until(lambda: consumer.stats.handled == 3, what="the answered acks counted")
        await consumer.stop(grace=1)
    assert seen == [1, 2, 3]


async def test_stop_waits_for_acks_on_their_way_and_counts_only_answered_ones() -> None:
    """``run`` ends once every ack is answered; an ack that failed is not counted as handled."""
    broker = HeldAcks()
    seen: list[int] = []
    consumer = consumer_of(broker, seen)
    await publish(broker, 1, 2)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await wait_until(lambda: len(broker.acking) == 2, what="two acks on their way")
        stopping = tasks.create_task(consumer.stop(grace=1))
        for _ in range(20):  # loop turns, not time: the stop has every chance to finish early
            await asyncio.sleep(0)
        assert not stopping.done(), "the consumer stopped with acks still on their way"
        await broker.answer()
        await broker.answer(fail=True)
        await stopping
    assert seen == [1, 2]
    assert consumer.stats.handled == 1


async def test_at_most_prefetch_acks_are_on_their_way_and_an_answer_makes_room() -> None:
    """With ``prefetch`` acks unanswered the next ack waits, and its handler's slot with it."""
    broker = HeldAcks()
    seen: list[int] = []
    consumer = consumer_of(broker, seen)
    await publish(broker, *range(1, 11))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run())
        await wait_until(lambda: len(seen) == 9, what="the ninth handled, its ack waiting")
        for _ in range(20):  # loop turns, not time: a tenth would be taken by now
            await asyncio.sleep(0)
        assert len(broker.acking) == SUBSCRIPTION.prefetch
        assert len(seen) == 9, "a handler took a message while its slot waited for an ack"
        await broker.answer()
        await wait_until(lambda: len(seen) == 10, what="room for the ninth ack: the tenth taken")
        while consumer.stats.handled < 10:
            if broker.acking:
                await broker.answer()
            else:
                await asyncio.sleep(0)
        await consumer.stop(grace=1)
    assert seen == list(range(1, 11))
