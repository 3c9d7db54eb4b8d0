"""DEV-15: a handler that writes its order and its event, then raises, leaves no ghost.

An inbox consumer handles 120 requests. For each it writes the business row
(``orders``), then the event through the outbox (``tx.publish``, which gives
the event the request's id as correlation id), then records the event's id on
the order. 100 of the requests then raise before the commit, on every attempt
(2, then dead-lettered); the other 20 commit, so the relay demonstrably
publishes to this broker.

Phase 1, relay stopped: an SQL anti-join (orders lacking an outbox row) returns
0 rows, and the failed requests left no order and no outbox row. Phase 2, the
relay runs until the outbox is empty: a reader that subscribed to the event
topic before anything was handled receives 0 messages carrying the failed
requests' correlation ids, and exactly the 20 committed events.

Every broker the relay publishes to, all in the test's process: memory and
SQLite on both stores, Redis, RabbitMQ and NATS on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
from pydantic import BaseModel

from tests.helpers.harness import report
from tests.store.brokers import BOTH, SERVERS, backend, backlog, matrix, opened_brokers
from tests.store.workers import MemoryLedger
from wirework.brokers import Broker, DeadLetterStore
from wirework.brokers.base import GroupAdmin, Subscription
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope, decode_wire, encode_binary
from wirework.store import InboxStats, Relay, Store, current_transaction, inbox_middleware
from wirework.testing.conformance import wait_until
from wirework.testing.ledger import check

REQUESTS = "ghost-requests"
EVENTS = "ghost-events"
HANDLERS = "orders"
READERS = "audit"
REQUEST_TYPE = "shop.place_order"
FAILING = 100
COMMITTING = 20
ATTEMPTS = 2
ORDERS = "CREATE TABLE orders (id TEXT PRIMARY KEY, event_id TEXT)"
ZOMBIES = (
    "SELECT o.id FROM orders o LEFT JOIN wirework_outbox w ON w.message_id = o.event_id "
    "WHERE w.message_id IS NULL"
)


class PlaceOrder(BaseModel):
    id: str


class OrderPlaced(BaseModel):
    __event_type__: ClassVar[str] = "shop.order_placed"
    id: str


@contextlib.asynccontextmanager
async def running(*tasks: asyncio.Task[None]) -> AsyncIterator[None]:
    """Cancel whichever of ``tasks`` is still running on the way out."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.fault
@pytest.mark.parametrize(BOTH, matrix(both=["memory", "sqlite"], postgresql=SERVERS), indirect=True)
async def test_a_handler_that_raises_after_writing_its_event_publishes_nothing(
    store: Store, broker_url: str
) -> None:
    """100 requests write an order and its event, then raise before commit: no order without
    an outbox row, and the broker never carries an event correlated with those requests."""
    async with store.transaction() as tx:
        await tx.execute(ORDERS)
    failing = {f"fail-{n}" for n in range(FAILING)}
    committing = {f"ok-{n}" for n in range(COMMITTING)}
    ledger = MemoryLedger()
    stats = InboxStats()

    async def handle(body: PlaceOrder, envelope: Envelope) -> None:
        ledger.record("invoked", envelope.id)
        tx = current_transaction()
        await tx.execute("INSERT INTO orders (id) VALUES ($1)", body.id)
        event = await tx.publish(EVENTS, OrderPlaced(id=body.id), source="/shop")
        await tx.execute("UPDATE orders SET event_id = $1 WHERE id = $2", event.id, body.id)
        if body.id in failing:
            raise RuntimeError("after the order and its event, before the commit")

    received: list[Envelope] = []

    async def read(broker: Broker) -> None:
        subscription = Subscription(topic=EVENTS, group=READERS, prefetch=50)
        async with contextlib.aclosing(broker.subscribe(subscription)) as deliveries:
            async for delivery in deliveries:
                received.append(decode_wire(delivery.message))
                await delivery.ack()

    async with opened_brokers(broker_url, broker_url, broker_url) as (publisher, handling, reading):
        assert isinstance(publisher, GroupAdmin)
        assert isinstance(publisher, DeadLetterStore)
        await publisher.declare_group(Subscription(topic=REQUESTS, group=HANDLERS))
        await publisher.declare_group(Subscription(topic=EVENTS, group=READERS))
        for one in sorted(failing | committing):
            request = Envelope.new(REQUEST_TYPE, PlaceOrder(id=one), source="/tests", id=one)
            ledger.record("invoke", one)
            await publisher.publish(REQUESTS, encode_binary(request))
            ledger.record("ok", one)
        consumer = Consumer(
            handling,
            Subscription(topic=REQUESTS, group=HANDLERS, prefetch=10),
            routes=[Route(REQUEST_TYPE, PlaceOrder, handle)],
            retry=RetryPolicy(base_delay=0.01, max_attempts=ATTEMPTS),
            concurrency=4,
            middleware=[inbox_middleware(store, HANDLERS, stats=stats)],
        )
        async with running(asyncio.create_task(read(reading))):
            consuming = asyncio.create_task(consumer.run())

            async def handled() -> bool:
                letters = await publisher.dead_letters(topic=REQUESTS, group=HANDLERS)
                return (
                    stats.claimed == COMMITTING
                    and len(letters) == FAILING
                    and await backlog(publisher, REQUESTS, HANDLERS) == 0
                )

            await wait_until(handled, 60, what="every request committed or dead-lettered")
            await consumer.stop()
            await consuming

            # Phase 1: the relay has not run, so every committed event is still a row.
            async with store.transaction() as tx:
                zombies = await tx.fetch(ZOMBIES)
                orders = {row["id"] for row in await tx.fetch("SELECT id FROM orders")}
                outbox = int(await tx.fetchval("SELECT count(*) FROM wirework_outbox"))
            assert received == [], "an event left before any relay ran"

            # Phase 2: the relay publishes what committed, and only that.
            relay = Relay(store, publisher, max_poll=0.2)
            relaying = asyncio.create_task(relay.run())
            async with running(relaying):

                async def relayed() -> bool:
                    async with store.transaction() as tx:
                        left = int(await tx.fetchval("SELECT count(*) FROM wirework_outbox"))
                    # Three rounds: the relay has waited once, so on PostgreSQL its LISTEN
                    # connection is up. Stopping it while that connect is in flight leaks the
                    # connection (Relay._wait cancels PostgresStore._listen; reported).
                    return (
                        left == 0
                        and relay.stats.rounds >= 3
                        and len(received) >= COMMITTING
                        and await backlog(publisher, EVENTS, READERS) == 0
                    )

                await wait_until(relayed, 30, what="the relay to publish every committed event")
                await relay.stop()
                await asyncio.wait_for(relaying, 10)
        letters = await publisher.dead_letters(topic=REQUESTS, group=HANDLERS)

    dead = [letter.message_id or "-" for letter in letters]
    result = dataclasses.replace(check(ledger.history(), dead), effects=Counter(orders))
    correlations = Counter(event.correlationid for event in received)
    ghosts = [event.id for event in received if event.correlationid in failing]
    report(
        f"ghosts[{backend(broker_url)},{store.dialect}]",
        result,
        zombies=len(zombies),
        ghosts=len(ghosts),
        rolled_back=stats.rolled_back,
        events=len(received),
    )
    assert zombies == [], f"orders without an outbox row: {zombies}"
    assert orders == committing, "a rolled-back order stayed, or a committed one is missing"
    assert outbox == COMMITTING
    assert ghosts == [], f"events of rolled-back requests reached the broker: {ghosts}"
    assert correlations == Counter(dict.fromkeys(committing, 1))
    assert sorted(dead) == sorted(failing), "each failed request dead-lettered once"
    assert result.invocations == Counter(
        {**dict.fromkeys(failing, ATTEMPTS), **dict.fromkeys(committing, 1)}
    ), "the failing handlers did not run (and write) on every attempt"
    assert stats.rolled_back == FAILING * ATTEMPTS
    assert not result.lost, str(result)
    assert not result.unexpected, str(result)
