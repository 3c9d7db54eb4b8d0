"""What the in-process broker does beyond the shared contract, on a manual clock.

Leases and delays are driven by ``ManualClock``, so nothing here sleeps: a
lease of 30 s runs out when the test advances the clock by 30 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from wirework.brokers import Delivery, Subscription, connect
from wirework.brokers.base import DeadLetterReason, Failure, GroupStats
from wirework.brokers.memory import MemoryBroker, MemorySettings
from wirework.clock import ManualClock
from wirework.envelope import WireMessage
from wirework.errors import BrokerClosedError, ConfigurationError, QueueFullError

TOPIC = "orders"


def message(n: int) -> WireMessage:
    return WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}")


def sub(group: str = "g", **options: object) -> Subscription:
    return Subscription.model_validate({"topic": TOPIC, "group": group, **options})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def broker(clock: ManualClock) -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker(clock=clock) as opened:
        yield opened


async def let_run() -> None:
    """Give every ready task a few turns of the loop (no time passes on the manual clock)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def receive(deliveries: AsyncIterator[Delivery]) -> Delivery:
    """The next delivery, which must already be due: the real-time bound only guards a hang."""
    return await asyncio.wait_for(anext(deliveries), timeout=1.0)


async def join(deliveries: AsyncIterator[Delivery]) -> None:
    """Start an iteration (which creates its group) and leave it again."""
    async with asyncio.TaskGroup() as tasks:
        waiting = tasks.create_task(receive(deliveries))
        await let_run()
        waiting.cancel()


async def row(broker: MemoryBroker, group: str | None = "g") -> GroupStats:
    [found] = [r for r in await broker.stats() if r.group == group]
    return found


async def test_lease_runs_out_on_the_manual_clock_only(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    await broker.publish(TOPIC, message(1))
    first = broker.subscribe(sub(lease_timeout=30))
    second = broker.subscribe(sub(lease_timeout=30))
    held = await receive(first)
    async with asyncio.TaskGroup() as tasks:
        waiting = tasks.create_task(receive(second))
        await clock.advance(29.9)
        await let_run()
        assert not waiting.done()
        assert (await row(broker)).in_flight == 1
        await clock.advance(0.1)
    taken_over = waiting.result()
    assert (taken_over.message.message_id, taken_over.attempt) == ("m1", 2)
    assert held.attempt == 1


async def test_stale_ack_is_ignored_and_counted(broker: MemoryBroker, clock: ManualClock) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub(lease_timeout=5, prefetch=1))
    late = await receive(deliveries)
    await clock.advance(5)
    current = await receive(deliveries)  # the lease ran out: the same message again
    await late.ack()
    assert broker.stale_settles == 1
    assert late.settled
    assert (await row(broker)).in_flight == 1, "the stale ack removed the newer delivery"
    await current.ack()
    assert (await row(broker)).backlog == 0
    await deliveries.aclose()


async def test_ack_after_lease_but_before_anyone_took_it_counts(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub(lease_timeout=5))
    slow = await receive(deliveries)
    await clock.advance(6)
    assert (await row(broker)).ready == 1, "an expired lease counts as ready"
    await slow.ack()
    assert broker.stale_settles == 0
    assert (await row(broker)).backlog == 0
    await deliveries.aclose()


async def test_publish_and_nack_delays_follow_the_manual_clock(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    deliveries = broker.subscribe(sub())
    async with asyncio.TaskGroup() as tasks:
        waiting = tasks.create_task(receive(deliveries))
        await let_run()
        await broker.publish(TOPIC, message(1), delay=10)
        await clock.advance(9.99)
        await let_run()
        assert not waiting.done()
        assert (await row(broker)).delayed == 1
        await clock.advance(0.01)
    delivery = waiting.result()
    failed_at = clock.now()
    await delivery.nack(delay=3, error=Failure(error_type="x.Y", message="later"))
    assert (await row(broker)).delayed == 1
    async with asyncio.TaskGroup() as tasks:
        waiting = tasks.create_task(receive(deliveries))
        await clock.advance(3)
    again = waiting.result()
    assert again.attempt == 2
    assert again.first_failure_at == failed_at
    await again.ack()
    await deliveries.aclose()


async def test_a_delayed_message_holds_back_later_ones_of_its_key(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    await broker.publish(TOPIC, message(1), key="k", delay=5)
    await broker.publish(TOPIC, message(2), key="k")
    await broker.publish(TOPIC, message(3), key="other")
    deliveries = broker.subscribe(sub())
    assert (await receive(deliveries)).message.message_id == "m3"
    await clock.advance(5)
    assert (await receive(deliveries)).message.message_id == "m1"
    await deliveries.aclose()


async def test_stats_rows(broker: MemoryBroker, clock: ManualClock) -> None:
    await broker.publish("unread", message(1))
    await broker.publish("unread", message(2), delay=60)
    assert await broker.stats() == [
        GroupStats(topic="unread", group=None, ready=1, delayed=1, in_flight=0, dead_lettered=0)
    ]
    for n in range(4):
        await broker.publish(TOPIC, message(n))
    a_side = broker.subscribe(sub("a", prefetch=3))
    first, second, third = [await receive(a_side) for _ in range(3)]
    b_side = broker.subscribe(sub("b"))
    await (await receive(b_side)).ack()
    await first.dead_letter(DeadLetterReason.REJECTED)
    await second.nack(delay=30)
    rows = {(r.topic, r.group): r for r in await broker.stats()}
    assert list(rows) == [(TOPIC, "a"), (TOPIC, "b"), ("unread", None)]
    assert rows[(TOPIC, "a")] == GroupStats(
        topic=TOPIC, group="a", ready=1, delayed=1, in_flight=1, dead_lettered=1
    )
    assert rows[(TOPIC, "b")].backlog == 3
    assert third.settled is False
    await a_side.aclose()
    await b_side.aclose()


async def test_every_group_settled_leaves_nothing(broker: MemoryBroker) -> None:
    for name in ("a", "b"):
        await join(broker.subscribe(sub(name)))
    await broker.publish(TOPIC, message(1))
    for name, settle in (("a", "ack"), ("b", "dead_letter")):
        deliveries = broker.subscribe(sub(name))
        delivery = await receive(deliveries)
        await (
            delivery.ack() if settle == "ack" else delivery.dead_letter(DeadLetterReason.REJECTED)
        )
        await deliveries.aclose()
    assert broker._topics[TOPIC].messages == {}


async def test_a_latest_group_drops_what_no_group_holds(broker: MemoryBroker) -> None:
    await broker.publish(TOPIC, message(1))
    await join(broker.subscribe(sub(start="latest")))
    assert broker._topics[TOPIC].messages == {}
    assert (await row(broker)).backlog == 0


async def test_a_replayed_message_is_not_seen_by_a_newer_group(broker: MemoryBroker) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub("a"))
    await (await receive(deliveries)).dead_letter(DeadLetterReason.REJECTED)
    [record] = await broker.dead_letters()
    assert await broker.replay([record.id, record.id]) == 1
    await join(broker.subscribe(sub("newcomer", start="earliest")))
    assert (await row(broker, "newcomer")).backlog == 0
    assert (await row(broker, "a")).ready == 1
    await deliveries.aclose()


async def test_max_queue_length_refuses_publish_until_a_group_settles(clock: ManualClock) -> None:
    broker = MemoryBroker(settings=MemorySettings(max_queue_length=2), clock=clock)
    await broker.publish(TOPIC, message(1))
    await broker.publish(TOPIC, message(2))
    with pytest.raises(QueueFullError, match="max_queue_length"):
        await broker.publish(TOPIC, message(3))
    assert (await row(broker, None)).ready == 2
    deliveries = broker.subscribe(sub())
    await (await receive(deliveries)).ack()
    await broker.publish(TOPIC, message(3))
    await broker.aclose()


def test_settings_come_from_the_url_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREWORK_MEMORY_MAX_QUEUE_LENGTH", "7")
    broker = connect("memory://?max_message_bytes=4096")
    assert isinstance(broker, MemoryBroker)
    assert (broker.max_message_bytes, broker.settings.max_queue_length) == (4096, 7)
    with pytest.raises(ConfigurationError, match="max_message_bytes"):
        connect("memory://?max_message_bytes=0")


async def test_negative_delays_are_refused(broker: MemoryBroker) -> None:
    with pytest.raises(ConfigurationError, match="delay"):
        await broker.publish(TOPIC, message(1), delay=-1)
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub())
    delivery = await receive(deliveries)
    with pytest.raises(ConfigurationError, match="delay"):
        await delivery.nack(delay=float("nan"))
    assert not delivery.settled
    await deliveries.aclose()


async def test_after_aclose_everything_but_aclose_raises(broker: MemoryBroker) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub())
    delivery = await receive(deliveries)
    await broker.aclose()
    with pytest.raises(StopAsyncIteration):
        await receive(deliveries)
    for call in (delivery.ack(), broker.stats(), broker.dead_letters(), broker.replay([])):
        with pytest.raises(BrokerClosedError):
            await call
    with pytest.raises(BrokerClosedError):
        broker.subscribe(sub())
    await broker.aclose()
