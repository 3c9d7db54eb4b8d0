"""The transactional outbox over both stores: no ghosts, no zombies, once, in order per key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import pytest
from pydantic import BaseModel

from tests.helpers.stores import PG_DSN, empty_store_url, opened_store
from wirework.brokers.base import Subscription
from wirework.brokers.memory import MemoryBroker
from wirework.envelope import Envelope, decode_wire
from wirework.errors import ConfigurationError, MessageTooLargeError
from wirework.store import Relay, Store, connect_store
from wirework.testing.conformance import wait_until

TOPIC = "orders.events"
ORDERS = "CREATE TABLE orders (id TEXT PRIMARY KEY)"


class OrderPlaced(BaseModel):
    __event_type__: ClassVar[str] = "shop.order_placed"
    id: str
    note: str = ""


class Received:
    """Everything one group gets from the broker, in delivery order, acked at once."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.at: dict[str, float] = {}

    def ids(self) -> list[str]:
        return [one.id for one in self.envelopes]

    def counts(self) -> Counter[str]:
        return Counter(self.ids())


@asynccontextmanager
async def receiving(broker: MemoryBroker) -> AsyncIterator[Received]:
    received = Received()
    subscription = Subscription(topic=TOPIC, group="reader", prefetch=100)
    await broker.declare_group(subscription)

    async def read() -> None:
        async with contextlib.aclosing(broker.subscribe(subscription)) as deliveries:
            async for delivery in deliveries:
                envelope = decode_wire(delivery.message)
                received.envelopes.append(envelope)
                received.at.setdefault(envelope.id, time.monotonic())
                await delivery.ack()

    task = asyncio.create_task(read())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def relaying(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 10)


async def outbox_rows(store: Store) -> int:
    async with store.transaction() as tx:
        return int(await tx.fetchval("SELECT count(*) FROM wirework_outbox"))


def event(order_id: str, key: str | None = None) -> Envelope:
    return Envelope.new(
        "shop.order_placed", OrderPlaced(id=order_id), source="/orders", id=order_id, key=key
    )


def relay_idle(store: Store) -> Callable[[], Awaitable[bool]]:
    async def empty() -> bool:
        return await outbox_rows(store) == 0

    return empty


async def test_a_rolled_back_transaction_publishes_nothing(store: Store) -> None:
    """No ghost: the event of a rolled-back order never leaves; a later commit's does."""
    async with store.transaction() as tx:
        await tx.execute(ORDERS)
    broker = MemoryBroker()
    async with receiving(broker) as received, relaying(Relay(store, broker, max_poll=0.2)):

        async def ghost() -> None:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES ($1)", "ghost")
                await tx.publish(TOPIC, event("ghost"))
                raise RuntimeError("payment declined")

        for _ in range(3):
            with pytest.raises(RuntimeError):
                await ghost()
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES ($1)", "real")
            await tx.publish(TOPIC, event("real"))
        await wait_until(lambda: "real" in received.ids(), 10, what="the committed event")
        await wait_until(relay_idle(store), 10, what="an empty outbox")
    assert received.ids() == ["real"]
    async with store.transaction() as tx:
        assert await tx.fetch("SELECT id FROM orders") == [{"id": "real"}]
    await broker.aclose()


async def test_committed_events_are_published_once_in_commit_order_per_key(store: Store) -> None:
    """Three writers, one key each, ten transactions apiece, with keyless events between:
    every event arrives once, each key's in commit order, over rounds of four rows."""
    broker = MemoryBroker()
    committed: dict[str | None, list[str]] = {}

    async def writer(key: str | None, count: int) -> None:
        for n in range(count):
            order_id = f"{key or 'none'}-{n}"
            async with store.transaction() as tx:
                await tx.publish(TOPIC, event(order_id), key=key)
            committed.setdefault(key, []).append(order_id)

    relay = Relay(store, broker, batch_size=4, max_poll=0.2)
    async with receiving(broker) as received, relaying(relay):
        await asyncio.gather(writer("a", 10), writer("b", 10), writer("c", 10), writer(None, 5))
        await wait_until(lambda: len(received.ids()) >= 35, 20, what="35 events")
        await wait_until(relay_idle(store), 10, what="an empty outbox")
    assert received.counts() == Counter({one: 1 for ids in committed.values() for one in ids})
    for key in ("a", "b", "c"):
        delivered = [e.id for e in received.envelopes if e.key == key]
        assert delivered == committed[key], key
    assert relay.stats.published == 35
    await broker.aclose()


async def test_same_key_transactions_publish_in_commit_order(store: Store) -> None:
    """A second transaction of the same key, begun while the first is open, is published after
    it: its row waits for the first commit (its sequence number comes after)."""
    broker = MemoryBroker()
    first_wrote = asyncio.Event()
    finish_first = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.publish(TOPIC, event("first", key="k"))
            first_wrote.set()
            await finish_first.wait()

    async def second() -> None:
        async with store.transaction() as tx:
            await tx.publish(TOPIC, event("second", key="k"))

    async with receiving(broker) as received, relaying(Relay(store, broker, max_poll=0.1)):
        one = asyncio.create_task(first())
        await asyncio.wait_for(first_wrote.wait(), 10)
        two = asyncio.create_task(second())
        await wait_until(lambda: blocked(store, two), 10, what="the second writer to wait")
        finish_first.set()
        await asyncio.gather(one, two)
        await wait_until(lambda: len(received.ids()) == 2, 10, what="both events")
    assert received.ids() == ["first", "second"]
    await broker.aclose()


async def blocked(store: Store, task: asyncio.Task[None]) -> bool:
    """The task finished (the caller's assertion will tell) or waits on a lock."""
    if task.done() or store.dialect == "sqlite":
        return True  # SQLite: transactions of one store never overlap, by design
    async with store.transaction() as tx:
        waiting = await tx.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%pg_advisory_xact_lock%' AND pid <> pg_backend_pid()"
        )
    return bool(waiting)


async def test_the_relay_wakes_at_once_after_a_commit_in_its_process(store: Store) -> None:
    """With polling at 4-5 s, a commit through the relay's own store is published within 1 s."""
    broker = MemoryBroker()
    relay = Relay(store, broker, min_poll=4.0, max_poll=5.0, lease_timeout=20.0)
    async with receiving(broker) as received, relaying(relay):
        await wait_until(lambda: relay.stats.rounds >= 2, 10, what="the relay to go idle")
        began = time.monotonic()
        async with store.transaction() as tx:
            await tx.publish(TOPIC, event("prompt"))
        await wait_until(lambda: "prompt" in received.ids(), 10, what="the event")
    assert received.at["prompt"] - began < 1.0


async def test_a_relay_in_another_process_is_woken_or_polls(store_url: str) -> None:
    """A commit through another store object (another process's view): published within 1 s
    through NOTIFY on PostgreSQL though the relay polls every 4-5 s; on SQLite by its
    short poll."""
    relay_store = connect_store(store_url)
    writer_store = connect_store(store_url)
    broker = MemoryBroker()
    sqlite = relay_store.dialect == "sqlite"
    polls = (0.05, 0.2) if sqlite else (4.0, 5.0)
    relay = Relay(relay_store, broker, min_poll=polls[0], max_poll=polls[1], lease_timeout=20.0)
    async with relay_store, writer_store, receiving(broker) as received, relaying(relay):
        await wait_until(lambda: relay.stats.rounds >= 2, 10, what="the relay to go idle")
        began = time.monotonic()
        async with writer_store.transaction() as tx:
            await tx.publish(TOPIC, event("elsewhere"))
        await wait_until(lambda: "elsewhere" in received.ids(), 10, what="the event")
    assert received.at["elsewhere"] - began < 1.0


async def test_one_relay_publishes_and_a_standby_takes_over(store: Store) -> None:
    """Two relays of one store: one holds the lease and publishes; when it stops, the other
    takes over and publishes what comes next; nothing is published twice."""
    broker = MemoryBroker()
    first = Relay(store, broker, max_poll=0.1, lease_timeout=2.0)
    second = Relay(store, broker, max_poll=0.1, lease_timeout=2.0)
    async with receiving(broker) as received, relaying(second):
        async with relaying(first):
            await wait_until(
                lambda: first.stats.leases_taken + second.stats.leases_taken == 1,
                10,
                what="one relay to take the lease",
            )
            holder, standby = (first, second) if first.stats.leases_taken else (second, first)
            for n in range(10):
                async with store.transaction() as tx:
                    await tx.publish(TOPIC, event(f"one-{n}", key="k"))
            await wait_until(lambda: len(received.ids()) == 10, 10, what="ten events")
            assert standby.stats.published == 0
            assert holder.stats.published == 10
        if holder is first:
            for n in range(5):
                async with store.transaction() as tx:
                    await tx.publish(TOPIC, event(f"two-{n}", key="k"))
            await wait_until(lambda: len(received.ids()) == 15, 10, what="five more events")
            assert second.stats.published == 5
    assert received.counts() == Counter(dict.fromkeys(received.ids(), 1))
    assert [e.id for e in received.envelopes][:10] == [f"one-{n}" for n in range(10)]


async def test_publishing_a_body_builds_its_envelope_and_checks_size(store: Store) -> None:
    """A body gets an envelope of its model's event type; an oversized one is refused."""
    async with store.transaction() as tx:
        envelope = await tx.publish(TOPIC, OrderPlaced(id="o1"), source="/orders", key="o1")
        assert (envelope.type, envelope.source, envelope.key) == (
            "shop.order_placed",
            "/orders",
            "o1",
        )
        with pytest.raises(ConfigurationError, match="source="):
            await tx.publish(TOPIC, OrderPlaced(id="o2"))
        with pytest.raises(MessageTooLargeError):
            await tx.publish(TOPIC, OrderPlaced(id="o3", note="x" * (1024 * 1024)), source="/o")
        with pytest.raises(ConfigurationError, match="topic"):
            await tx.publish("bad topic!", OrderPlaced(id="o4"), source="/o")
        row = await tx.fetchrow("SELECT message_id, message_key, topic FROM wirework_outbox")
    assert row == {"message_id": envelope.id, "message_key": "o1", "topic": TOPIC}
    assert await outbox_rows(store) == 1


@pytest.mark.ext
async def test_a_relay_stopped_while_it_starts_listening_leaves_no_connection_open(
    tmp_path: Path,
) -> None:
    """PostgreSQL: a relay stopped while its store is connecting to LISTEN closes that
    connection (it used to leak, one per stop, until the process ended)."""
    async with empty_store_url("postgresql", tmp_path) as url:
        schema = url.rsplit("schema=", 1)[1]
        watcher = await asyncpg.connect(PG_DSN)

        async def connections() -> int:
            # Listener connections set search_path to the test's schema; nothing else does.
            count: int = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
            return count

        try:
            before = await connections()
            broker = MemoryBroker()
            async with opened_store(url) as store:
                for turn in range(60):
                    relay = Relay(store, broker, min_poll=0.01, max_poll=0.05)
                    running = asyncio.create_task(relay.run())
                    # Stop it 0-12 ms in: before, during and after connecting to LISTEN.
                    await asyncio.sleep(turn * 0.0002)
                    await relay.stop()
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            await broker.aclose()

            async def back_to_before() -> bool:
                return await connections() <= before

            await wait_until(back_to_before, 10, what=f"connections back to {before} ({schema})")
        finally:
            await watcher.close()
