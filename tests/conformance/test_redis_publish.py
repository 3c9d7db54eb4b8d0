"""The Redis publish script and the hand-over it sends to an idle subscription.

A publish takes its dedup id and stores the message in one script, which also
does an idle consumer's fetch and sends the rows in the wake-up, framed for
``redis_link.handovers``. These checks run on the shared server (``-k redis``
selects them with the conformance suite), except the reader's own, and say
what each one proves in its first line.
"""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest
import redis.asyncio

from tests.conformance.conftest import REDIS_URL, server_target_of
from wirework.brokers import redis_scripts as scripts
from wirework.brokers.base import Delivery, Subscription
from wirework.brokers.redis import RedisBroker, RedisSettings
from wirework.brokers.redis_link import Doorbell, handovers
from wirework.brokers.redis_model import key_prefix
from wirework.envelope import WireMessage
from wirework.errors import QueueFullError
from wirework.testing.conformance import wait_until

pytestmark = pytest.mark.ext

TOPIC = "orders"
#: Far beyond every wait here: nothing may come back because a lease ran out.
LEASE = 60.0


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    async with server_target_of("redis") as target:
        yield target.namespace


def open_broker(namespace: str, **settings: Any) -> RedisBroker:
    return RedisBroker(REDIS_URL, settings=RedisSettings(namespace=namespace, **settings))


def message(n: int, body: bytes | None = None) -> WireMessage:
    headers = {"ce-id": f"m{n}", "ce-source": "/tests", "ce-type": "tests.item", "ce-x": "é"}
    return WireMessage(headers=headers, body=body if body is not None else b'{"n": %d}' % n)


async def send(broker: RedisBroker, publish_id: str, sent: WireMessage) -> Any:
    """One run of the publish script under ``publish_id``, as a re-send after a cut runs it."""
    args: list[str | bytes | int] = [
        TOPIC,
        orjson.dumps(dict(sent.headers)),
        sent.body,
        "0",
        "",
        0,
        publish_id,
        60_000,
        broker.settings.max_queue_length or 0,
    ]
    return await broker._call(scripts.PUBLISH, args, what="publishing")


async def test_a_re_send_under_the_same_id_stores_nothing_more(
    namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    """The second run of one publish id answers 'duplicate' and adds no entry."""
    async with open_broker(namespace) as broker:
        assert await send(broker, "p1", message(1)) == scripts.SETTLED
        assert await send(broker, "p1", message(1)) == scripts.DUPLICATE
        assert await redis_client.xlen(key_prefix(namespace) + "t:" + TOPIC) == 1
        assert await send(broker, "p2", message(2)) == scripts.SETTLED
        assert await redis_client.xlen(key_prefix(namespace) + "t:" + TOPIC) == 2


async def test_a_publish_refused_as_full_is_stored_when_sent_again_with_room(
    namespace: str,
) -> None:
    """A publish refused by ``max_queue_length`` leaves its id untaken: the same id, sent
    again once there is room, stores the message instead of passing for a duplicate."""
    async with open_broker(namespace, max_queue_length=1) as broker:
        subscription = Subscription(topic=TOPIC, group="g", start="earliest", lease_timeout=LEASE)
        await broker.declare_group(subscription)
        await broker.publish(TOPIC, message(1))
        assert await send(broker, "again", message(2)) == scripts.FULL
        with pytest.raises(QueueFullError):
            await broker.publish(TOPIC, message(3))
        deliveries = broker.subscribe(subscription)
        first = await anext(deliveries)
        assert first.message.message_id == "m1"
        await first.ack()
        assert await send(broker, "again", message(2)) == scripts.SETTLED
        second = await anext(deliveries)
        assert second.message.message_id == "m2"
        await second.ack()
        await deliveries.aclose()


async def test_a_topic_is_listed_with_its_first_message_and_again_after_its_last_group_went(
    namespace: str,
) -> None:
    """``stats`` lists a topic from its first publish on (it is added to the topic list
    then, not on every publish), and again when it is published to after deleting its
    last group took it off the list."""
    async with open_broker(namespace) as broker:
        await broker.publish(TOPIC, message(1))
        await broker.publish(TOPIC, message(2))
        rows = [(row.topic, row.group, row.ready) for row in await broker.stats()]
        assert rows == [(TOPIC, None, 2)]
        await broker.declare_group(Subscription(topic=TOPIC, group="g"))
        await broker.delete_group(TOPIC, "g")
        assert [row.topic for row in await broker.stats()] == []
        await broker.publish(TOPIC, message(3))
        rows = [(row.topic, row.group, row.ready) for row in await broker.stats()]
        assert rows == [(TOPIC, None, 1)]


async def go_idle(
    deliveries: AsyncIterator[Delivery],
    broker: RedisBroker,
    redis_client: redis.asyncio.Redis,
    namespace: str,
) -> str:
    """One message through, so the subscription went idle and registered for hand-overs;
    the consumer name it registered under."""
    await broker.publish(TOPIC, message(0))
    await (await anext(deliveries)).ack()
    key = key_prefix(namespace) + "ic:" + TOPIC

    async def registered() -> bool:
        return bool(await redis_client.hgetall(key))

    await wait_until(registered, what="the idle subscription registered for hand-overs")
    (consumer,) = await redis_client.hkeys(key)
    return consumer.decode() if isinstance(consumer, bytes) else str(consumer)


async def test_a_hand_over_carries_the_message_as_stored_keyed_or_not(
    namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    """The wake-up a publish sends an idle subscription reads back, with ``handovers``, as
    the rows a fetch returns: its member, attempt 1, no failure, headers, body byte for
    byte (NULs, colons and digits included) and the key; the subscription hands it out."""
    body = b"\x00\xff12:x,\n" + bytes(range(256))
    async with (
        open_broker(namespace, poll_interval=2.0) as publisher,
        open_broker(namespace, poll_interval=2.0) as subscriber,
    ):
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        consumer = await go_idle(deliveries, publisher, redis_client, namespace)
        listener = redis_client.pubsub()
        await listener.subscribe(key_prefix(namespace) + "w:" + TOPIC)
        try:
            for n, key in ((1, "customer-7"), (2, None)):
                await publisher.publish(TOPIC, message(n, body), key=key)
                payload = await _next_wake_up(listener)
                ((to, rows, full),) = handovers(payload)
                assert (to, full) == (consumer, False)
                member, attempt, first, headers, got, has_key, got_key = rows
                assert (attempt, first) == (b"1", b"")
                assert orjson.loads(headers) == dict(message(n).headers)
                assert got == body
                assert (has_key, got_key) == ((b"1", key.encode()) if key else (b"0", b""))
                delivery = await anext(deliveries)
                assert delivery.member == member.decode()
                assert (delivery.message.body, delivery.key) == (body, key)
                await delivery.ack()
                await wait_until(
                    lambda: _registered(redis_client, namespace),
                    what="the subscription registered again",
                )
        finally:
            await listener.aclose()  # type: ignore[no-untyped-call]
            await deliveries.aclose()


async def _registered(redis_client: redis.asyncio.Redis, namespace: str) -> bool:
    return bool(await redis_client.hgetall(key_prefix(namespace) + "ic:" + TOPIC))


async def _next_wake_up(listener: Any) -> bytes:
    async with asyncio.timeout(5):
        while True:
            found = await listener.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if found is not None and found["data"]:
                data: bytes = found["data"]
                return data


async def test_the_listener_lets_the_subscription_take_a_hand_over_before_it_reads_again(
    namespace: str, redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a hand-over, the subscription it woke takes its message before the listener
    reads its connection again: that read would otherwise go first, on the way of every
    request to an idle responder."""
    events: list[str] = []
    real_next = Doorbell._next_message
    real_deliveries_of = RedisBroker._deliveries_of

    async def recorded_next(pubsub: Any) -> Any:
        events.append("read")
        found = await real_next(pubsub)
        if found is not None:
            events.append("wake-up")
        return found

    def recorded_deliveries_of(self: RedisBroker, held: Any, rows: Any) -> Any:
        events.append("taken")
        return real_deliveries_of(self, held, rows)

    monkeypatch.setattr(Doorbell, "_next_message", staticmethod(recorded_next))
    monkeypatch.setattr(RedisBroker, "_deliveries_of", recorded_deliveries_of)
    async with (
        open_broker(namespace, poll_interval=2.0) as publisher,
        open_broker(namespace, poll_interval=2.0) as subscriber,
    ):
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        await go_idle(deliveries, publisher, redis_client, namespace)
        taking = asyncio.create_task(anext(deliveries))
        # Until the subscription waits for its wake-up (suspended in an await, not at a yield).
        generator = cast(types.AsyncGeneratorType[Delivery, None], deliveries)
        await wait_until(lambda: generator.ag_await is not None, what="the subscription waits")
        events.clear()
        await publisher.publish(TOPIC, message(1))
        delivery = await asyncio.wait_for(taking, 5)
        assert delivery.message.message_id == "m1"
        await delivery.ack()
        handed = events.index("wake-up")
        assert events[handed + 1] == "taken", events
        await deliveries.aclose()


def test_the_reader_refuses_what_is_not_a_whole_hand_over() -> None:
    """A payload of another format (the netstrings an earlier version sent, a stray
    PUBLISH) or one cut short raises ValueError, which the listener turns into a ring,
    never rows read from the wrong bytes."""
    one = (
        b"\x01"
        + _string(b"c1")
        + (1).to_bytes(4, "big")
        + b"\x00"
        + _string(b"1-0")
        + _string(b"{}")
        + _string(b"body")
        + b"\x01"
        + _string(b"k")
    )
    assert handovers(one) == [("c1", [b"1-0", b"1", b"", b"{}", b"body", b"1", b"k"], False)]
    for payload in (
        b"2:c1,1:1,1:0,3:1-0,1:1,0:,2:{},4:body,1:0,0:",
        b"2:c11:11:03:1-01:10:2:{}4:body1:00:",
        b"not a hand-over",
        *(one[:cut] for cut in range(2, len(one))),
    ):
        with pytest.raises(ValueError, match="hand-over payload"):
            handovers(payload)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


async def test_every_publish_takes_a_dedup_id_of_its_own(
    namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    """Publishes from one broker and from two never share a dedup id (``pid:<id>``): a
    shared one would make the later publish pass for a re-send and store nothing."""
    async with open_broker(namespace) as one, open_broker(namespace) as other:
        for n in range(3):
            await one.publish(TOPIC, message(n))
            await other.publish(TOPIC, message(10 + n))
        ids = [key async for key in redis_client.scan_iter(match=key_prefix(namespace) + "pid:*")]
        assert len(set(ids)) == 6
        assert await redis_client.xlen(key_prefix(namespace) + "t:" + TOPIC) == 6


def test_a_forked_process_publishes_under_ids_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker copied into a forked process draws a new prefix for its dedup ids there, so
    the child's counted ids never repeat the ones its parent goes on sending."""
    broker = open_broker("unused")
    parent = [broker._publish_id() for _ in range(3)]
    assert len(set(parent)) == 3
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)
    child = broker._publish_id()
    assert child.rsplit("-", 1)[0] != parent[0].rsplit("-", 1)[0]
