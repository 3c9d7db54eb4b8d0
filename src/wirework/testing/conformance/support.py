"""Small helpers the conformance checks share: waiting with deadlines, taking deliveries.

Every wait in the suite has a deadline and fails with a message that says
what did not happen; nothing sleeps for a fixed time to "let things settle".
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime

from pydantic import BaseModel

from wirework.brokers.base import (
    Broker,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    Delivery,
    GroupStats,
    Inspectable,
    Subscription,
)
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import BrokerError

#: Seconds any awaited condition gets before a check fails; generous, as a
#: passing check returns as soon as the condition holds.
DEADLINE = 5.0

#: Lease used where a check waits for one to run out (RELIABILITY.md asks 1 s; half keeps it fast).
SHORT_LEASE = 0.5

#: Event type the suite publishes and its consumers route.
ITEM_TYPE = "wirework.conformance.item"

_POLL_INTERVAL = 0.01


class Item(BaseModel):
    """The body of every well-formed message the suite publishes."""

    n: int


def item(n: int, *, key: str | None = None, event_type: str = ITEM_TYPE) -> WireMessage:
    """A binary-mode CloudEvent with id ``m<n>`` and body ``{"n": n}``."""
    envelope = Envelope.new(
        event_type, Item(n=n), source="wirework.conformance", key=key, id=f"m{n}"
    )
    return encode_binary(envelope)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = DEADLINE,
    *,
    what: str = "condition",
) -> None:
    """Return as soon as ``predicate()`` is true; fail the check after ``timeout`` seconds.

    The predicate may be a plain or an async function, so it can ask the
    broker (``stats()``) as well as look at local state.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(_POLL_INTERVAL)


@asynccontextmanager
async def subscribed(
    broker: Broker, subscription: Subscription
) -> AsyncIterator[AsyncIterator[Delivery]]:
    """``broker.subscribe(subscription)``, left (``aclose``) on exit so its deliveries go back."""
    deliveries = broker.subscribe(subscription)
    try:
        yield deliveries
    finally:
        close = getattr(deliveries, "aclose", None)
        if close is not None:
            await close()


async def take(
    deliveries: AsyncIterator[Delivery],
    count: int,
    *,
    ack: bool = False,
    timeout: float = DEADLINE,
) -> list[Delivery]:
    """The next ``count`` deliveries (acked if ``ack``), or a failed check after ``timeout``."""
    taken: list[Delivery] = []
    try:
        async with asyncio.timeout(timeout):
            while len(taken) < count:
                delivery = await anext(deliveries)
                if ack:
                    await delivery.ack()
                taken.append(delivery)
    except TimeoutError:
        raise AssertionError(
            f"got {len(taken)} of {count} deliveries within {timeout}s: "
            f"{[message_id(d) for d in taken]}"
        ) from None
    except StopAsyncIteration:
        raise AssertionError(f"subscription ended after {len(taken)} of {count}") from None
    return taken


async def next_delivery(deliveries: AsyncIterator[Delivery]) -> Delivery:
    """``anext`` as a coroutine, so that a task group can own the wait."""
    return await anext(deliveries)


def message_id(delivery: Delivery) -> str | None:
    return delivery.message.message_id


def ids(deliveries: Sequence[Delivery]) -> list[str | None]:
    return [message_id(d) for d in deliveries]


def inspectable(broker: Broker) -> Inspectable:
    """The broker as ``Inspectable``; the suite reads backlogs through ``stats()``."""
    assert isinstance(broker, Inspectable), f"{type(broker).__name__} does not implement stats()"
    return broker


def dead_letter_store(broker: Broker) -> DeadLetterStore:
    """The broker as ``DeadLetterStore``; the suite reads the dead letters it produces."""
    assert isinstance(broker, DeadLetterStore), (
        f"{type(broker).__name__} does not implement dead_letters()/replay()"
    )
    return broker


async def group_stats(broker: Broker, topic: str, group: str | None) -> GroupStats | None:
    """The ``stats()`` row of one (topic, group), or None if the broker has none."""
    for row in await inspectable(broker).stats():
        if row.topic == topic and row.group == group:
            return row
    return None


async def stats_row(broker: Broker, topic: str, group: str | None) -> GroupStats:
    """The ``stats()`` row of one (topic, group), which must exist."""
    row = await group_stats(broker, topic, group)
    if row is None:
        raise AssertionError(f"stats() has no row for topic {topic!r}, group {group!r}")
    return row


async def wait_for_group(broker: Broker, subscription: Subscription) -> None:
    """Wait until the subscription's group exists (groups appear on first use)."""

    async def exists() -> bool:
        return await group_stats(broker, subscription.topic, subscription.group) is not None

    await wait_until(exists, what=f"group {subscription.group!r} on {subscription.topic!r}")


async def wait_for_backlog(broker: Broker, topic: str, group: str, backlog: int) -> GroupStats:
    """Wait until the group's ready + delayed + in-flight count is ``backlog``; return the row."""
    found: list[GroupStats | None] = [None]

    async def reached() -> bool:
        found[0] = await group_stats(broker, topic, group)
        return found[0] is not None and found[0].backlog == backlog

    try:
        await wait_until(reached, what=f"backlog {backlog} on {topic}/{group}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last stats row: {found[0]}") from None
    row = found[0]
    assert row is not None
    return row


async def dead_letters_of(
    broker: Broker, topic: str, *, reason: DeadLetterReason | None = None, count: int
) -> list[DeadLetter]:
    """Wait until ``topic`` has ``count`` dead letters (of ``reason``); return them oldest first."""
    store = dead_letter_store(broker)
    found: list[DeadLetter] = []

    async def reached() -> bool:
        found[:] = await store.dead_letters(topic=topic, reason=reason, limit=count + 100)
        return len(found) >= count

    await wait_until(reached, what=f"{count} dead letters ({reason}) on {topic}")
    assert len(found) == count, f"expected {count} dead letters, got {len(found)}: {found}"
    return found


@contextmanager
def raises(kind: type[BaseException], what: str) -> Iterator[None]:
    """Fail the check unless the block raises ``kind`` (other errors propagate as they are)."""
    try:
        yield
    except kind:
        return
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing was raised")


async def settle_stale(broker: Broker, settle: Awaitable[None]) -> None:
    """Settle a delivery of ``broker`` that no longer holds its message (lease ran out,
    or its subscription was left): the backend may return, counting it in
    ``stale_settles``, or raise a ``BrokerError``, as a network backend may find the
    delivery gone; either way it must not touch the message (the caller checks that)."""
    before = broker.stale_settles
    try:
        await settle
    except BrokerError:
        return
    counted = broker.stale_settles - before
    assert counted == 1, f"a stale settle returned but stale_settles rose by {counted}, not 1"


async def create_groups(broker: Broker, *subscriptions: Subscription) -> None:
    """Create the subscriptions' groups before anything is published to their topics.

    Groups appear on first use, so this starts an iteration, waits for the
    group in ``stats()``, and leaves it. Call it only while the topic is empty:
    a message taken meanwhile would come back with its attempt count raised.
    """
    for subscription in subscriptions:
        async with subscribed(broker, subscription) as deliveries, asyncio.TaskGroup() as tasks:
            waiting = tasks.create_task(next_delivery(deliveries))
            await wait_for_group(broker, subscription)
            waiting.cancel()


def same_time(first: datetime | None, second: datetime | None) -> bool:
    """Equal to the millisecond: a backend may store timestamps with less precision."""
    if first is None or second is None:
        return first is second
    return abs((first - second).total_seconds()) < 0.001
