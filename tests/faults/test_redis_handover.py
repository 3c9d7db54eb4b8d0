"""The Redis hand-over: a publish gives an idle subscription its message in the wake-up.

An idle subscription registers its consumer; a publish from any process then
does that consumer's fetch itself and sends what it took over pub/sub, so the
subscription hands it out without a fetch round trip of its own. Pub/sub is at
most once: a hand-over sent while the subscriber's listening connection is
cut is lost on the way, and the subscription must take those copies again as
soon as it is back, not when their lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio

from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.services import require_service
from wirework.brokers.base import Delivery, Subscription
from wirework.brokers.redis import RedisBroker, RedisSettings, purge_namespace
from wirework.brokers.redis_model import key_prefix
from wirework.envelope import WireMessage
from wirework.testing.conformance import wait_until

pytestmark = [pytest.mark.ext]

SHARED = ("127.0.0.1", 6379)
SHARED_URL = "redis://127.0.0.1:6379/0"
TOPIC = "handover"
#: Far beyond every wait here: a copy that came back only when its lease ran out fails.
LEASE = 60.0


def open_broker(url: str, namespace: str) -> RedisBroker:
    return RedisBroker(
        url,
        settings=RedisSettings(
            namespace=namespace,
            connect_timeout=0.5,
            command_timeout=2.0,
            reconnect_initial_backoff=0.02,
            reconnect_max_backoff=0.25,
            poll_interval=2.0,
        ),
    )


def message(n: int) -> WireMessage:
    headers = {
        "ce-id": f"m{n}",
        "ce-source": "tests.handover",
        "ce-type": "tests.item",
        "ce-specversion": "1.0",
    }
    return WireMessage(headers=headers, body=b'{"n": %d}' % n)


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    require_service("Redis", *SHARED)
    name = f"wwtest-{uuid.uuid4().hex[:12]}"
    yield name
    await purge_namespace(SHARED_URL, name)


async def registered(client: redis.asyncio.Redis, namespace: str) -> dict[Any, Any]:
    """Consumers registered for hand-overs on the topic (``ic:T``)."""
    found: dict[Any, Any] = await client.hgetall(key_prefix(namespace) + "ic:" + TOPIC)
    return found


async def handed(client: redis.asyncio.Redis, namespace: str) -> dict[Any, Any]:
    """Per consumer, how many messages were handed over to it, and when (``ih:T``)."""
    found: dict[Any, Any] = await client.hgetall(key_prefix(namespace) + "ih:" + TOPIC)
    return found


async def until_registered(client: redis.asyncio.Redis, namespace: str) -> None:
    """Wait until a subscription of the topic is registered for hand-overs."""

    async def is_registered() -> bool:
        return bool(await registered(client, namespace))

    await wait_until(is_registered, what="the idle subscription registered")


async def go_idle(
    deliveries: AsyncIterator[Delivery],
    publisher: RedisBroker,
    client: redis.asyncio.Redis,
    namespace: str,
) -> None:
    """One message through, so the subscription has fetched, emptied the topic and gone
    idle, registered for hand-overs."""
    await publisher.publish(TOPIC, message(0))
    await (await anext(deliveries)).ack()
    await until_registered(client, namespace)


@contextlib.asynccontextmanager
async def behind_a_proxy(
    namespace: str,
) -> AsyncIterator[tuple[FaultProxy, RedisBroker, RedisBroker, redis.asyncio.Redis]]:
    """(proxy, subscriber reaching Redis through it, publisher reaching it directly, client)."""
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    async with FaultProxy(*SHARED) as proxy:
        subscriber = open_broker(f"redis://127.0.0.1:{proxy.port}/0", namespace)
        publisher = open_broker(SHARED_URL, namespace)
        try:
            yield proxy, subscriber, publisher, client
        finally:
            await subscriber.aclose()
            await publisher.aclose()
            await client.aclose()


@contextlib.contextmanager
def cut_and_refused(proxy: FaultProxy) -> Iterator[None]:
    """Cut the proxy's connections and point it at a port nothing listens on, so
    reconnects are refused until the test points it back (``proxy.upstream``)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy.upstream = closed.getsockname()
        proxy.cut()
        yield


async def assert_handed_over_once(client: redis.asyncio.Redis, namespace: str) -> None:
    counts = [int(v.split()[0]) for v in (await handed(client, namespace)).values()]
    assert counts == [1], "the publish did not hand the message over: this test proved nothing"


def link_down(broker: RedisBroker) -> Callable[[], bool]:
    return lambda: not broker._link.up.is_set()


def link_up(broker: RedisBroker) -> Callable[[], bool]:
    return lambda: broker._link.up.is_set()


async def test_a_publish_hands_the_message_to_an_idle_subscription(namespace: str) -> None:
    """Published from another broker, the message reaches the idle subscription as a hand-over."""
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    subscriber, publisher = open_broker(SHARED_URL, namespace), open_broker(SHARED_URL, namespace)
    try:
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        await go_idle(deliveries, publisher, client, namespace)
        await publisher.publish(TOPIC, message(1))
        second = await anext(deliveries)
        assert second.message.message_id == "m1"
        assert [int(v.split()[0]) for v in (await handed(client, namespace)).values()] == [1]
        await second.ack()
        await deliveries.aclose()
        assert await handed(client, namespace) == {}, "the release forgot the consumer"
    finally:
        await subscriber.aclose()
        await publisher.aclose()
        await client.aclose()


@pytest.mark.parametrize("noticed", [False, True], ids=["cut-unnoticed", "cut-noticed"])
async def test_a_hand_over_lost_with_the_connection_comes_again_at_once(
    namespace: str, noticed: bool
) -> None:
    """Handed over while the subscriber's connections are cut, the message is delivered once
    they are back, long before its lease would run out. ``cut-noticed``: the publish comes
    after the subscriber saw the cut, so its first fetch after the loss fails; the
    recovery must wait for one that runs (a fresh-clone run lost the copy so)."""
    async with behind_a_proxy(namespace) as (proxy, subscriber, publisher, client):
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        await go_idle(deliveries, publisher, client, namespace)
        with cut_and_refused(proxy):
            if noticed:
                await wait_until(link_down(subscriber), what="the subscriber noticed the cut")
            await publisher.publish(TOPIC, message(1))
        await assert_handed_over_once(client, namespace)
        proxy.upstream = SHARED
        delivery = await wait_for_delivery(deliveries, timeout=10.0)
        assert delivery.message.message_id == "m1"
        assert delivery.attempt == 1
        await delivery.ack()
        await deliveries.aclose()


async def wait_for_delivery(deliveries: AsyncIterator[Delivery], *, timeout: float) -> Delivery:
    async with asyncio.timeout(timeout):
        return await anext(deliveries)


async def test_leaving_hands_back_a_hand_over_never_received(namespace: str) -> None:
    """A subscription that leaves with a hand-over still lost on the way hands that copy
    back: another consumer of the group gets it at once, not when its lease runs out."""
    async with behind_a_proxy(namespace) as (proxy, subscriber, other, client):
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        await go_idle(deliveries, other, client, namespace)
        with cut_and_refused(proxy):
            await other.publish(TOPIC, message(1))
        await assert_handed_over_once(client, namespace)
        # Leaving hands back over the subscriber's own link; while that is down (the
        # cut noticed, the reconnect not yet made), leases run out instead, by design.
        await wait_until(link_down(subscriber), what="the subscriber noticed the cut")
        proxy.upstream = SHARED
        await wait_until(link_up(subscriber), what="the subscriber reconnected")
        await deliveries.aclose()  # it never asked again: the hand-over is unseen
        taking = other.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        delivery = await wait_for_delivery(taking, timeout=10.0)
        assert (delivery.message.message_id, delivery.attempt) == ("m1", 1)
        await delivery.ack()
        await taking.aclose()


async def test_an_unreadable_wake_up_is_only_a_ring(namespace: str) -> None:
    """A wake-up this version cannot read (a stray PUBLISH, another version's format) does
    not stop the listener: the next hand-over still arrives at once, not at the next poll."""
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    subscriber, publisher = open_broker(SHARED_URL, namespace), open_broker(SHARED_URL, namespace)
    try:
        deliveries = subscriber.subscribe(Subscription(topic=TOPIC, group="g", lease_timeout=LEASE))
        await go_idle(deliveries, publisher, client, namespace)
        channel = key_prefix(namespace) + "w:" + TOPIC
        assert await client.publish(channel, b"not a hand-over") == 1
        await until_registered(client, namespace)  # again, after the ring
        await publisher.publish(TOPIC, message(1))
        # Well inside poll_interval (2 s): a dead listener would leave it to the next poll.
        delivery = await wait_for_delivery(deliveries, timeout=1.5)
        assert delivery.message.message_id == "m1"
        await delivery.ack()
        await deliveries.aclose()
    finally:
        await subscriber.aclose()
        await publisher.aclose()
        await client.aclose()
