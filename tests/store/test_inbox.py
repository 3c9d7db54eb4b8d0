"""The inbox over both stores: duplicates absorbed, failures undone, concurrent copies serialised.

The effects table has no unique constraint, so a broken inbox cannot hide
behind the database (RELIABILITY.md §2.0); invocations are counted outside
the transaction.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import orjson
from pydantic import BaseModel

from wirework.brokers.base import DeadLetterReason, Subscription
from wirework.brokers.memory import MemoryBroker
from wirework.consumer import (
    ConsumeApp,
    ConsumeMiddleware,
    Consumer,
    Incoming,
    RetryPolicy,
    Route,
)
from wirework.envelope import Envelope, encode_binary
from wirework.errors import Reject
from wirework.store import (
    InboxStats,
    Store,
    TransactionError,
    current_transaction,
    inbox_middleware,
    prune_inbox,
)
from wirework.testing.conformance import wait_until

TOPIC = "orders"
GROUP = "billing"
ITEM = "test.item"
EFFECTS = "CREATE TABLE effects (message_id TEXT NOT NULL, amount INTEGER NOT NULL)"
BALANCES = "CREATE TABLE balances (account TEXT PRIMARY KEY, total INTEGER NOT NULL)"


class Item(BaseModel):
    id: str
    amount: int = 1


Handler = Callable[[Item, Envelope], Awaitable[None]]


async def prepare(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.execute(EFFECTS)
        await tx.execute(BALANCES)


async def effects(store: Store) -> Counter[str]:
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT message_id FROM effects")
    return Counter(row["message_id"] for row in rows)


async def publish(broker: MemoryBroker, message_id: str, copies: int = 1) -> None:
    envelope = Envelope.new(ITEM, Item(id=message_id), source="/tests", id=message_id)
    for _ in range(copies):
        await broker.publish(TOPIC, encode_binary(envelope))


@asynccontextmanager
async def consuming(
    broker: MemoryBroker,
    store: Store,
    handler: Handler,
    stats: InboxStats,
    *,
    consumers: int = 1,
    lease: float = 5.0,
    outer: ConsumeMiddleware | None = None,
    concurrency: int = 1,
) -> AsyncIterator[list[Consumer]]:
    running = [
        Consumer(
            broker,
            Subscription(topic=TOPIC, group=GROUP, lease_timeout=lease, prefetch=4),
            routes=[Route(ITEM, Item, handler)],
            retry=RetryPolicy(base_delay=0.01, max_attempts=3),
            concurrency=concurrency,
            middleware=[*([outer] if outer else []), inbox_middleware(store, GROUP, stats=stats)],
        )
        for _ in range(consumers)
    ]
    tasks = [asyncio.create_task(consumer.run()) for consumer in running]
    try:
        yield running
    finally:
        for consumer in running:
            await consumer.stop(grace=2.0)
        await asyncio.gather(*tasks)


async def backlog(broker: MemoryBroker) -> int:
    return sum(row.backlog for row in await broker.stats() if row.group == GROUP)


async def test_duplicate_deliveries_run_the_handler_once(store: Store) -> None:
    """Each message published three times: one invocation, one effect row, two duplicates."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()
    invocations: Counter[str] = Counter()

    async def handle(body: Item, envelope: Envelope) -> None:
        invocations[envelope.id] += 1
        tx = current_transaction()
        await tx.execute(
            "INSERT INTO effects (message_id, amount) VALUES ($1, $2)", envelope.id, body.amount
        )
        total = await tx.fetchval("SELECT total FROM balances WHERE account = $1", "acc")
        await tx.upsert("balances", ["account"], {"account": "acc", "total": (total or 0) + 1})

    ids = [f"m{n}" for n in range(10)]
    async with consuming(broker, store, handle, stats):
        for one in ids:
            await publish(broker, one, copies=3)

        async def done() -> bool:
            return stats.claimed + stats.duplicates == 30 and await backlog(broker) == 0

        await wait_until(done, 20, what="30 deliveries handled or absorbed")
    assert stats.claimed == 10
    assert stats.duplicates == 20
    assert invocations == Counter(dict.fromkeys(ids, 1))
    assert await effects(store) == Counter(dict.fromkeys(ids, 1))
    async with store.transaction() as tx:
        assert await tx.fetchval("SELECT total FROM balances WHERE account = $1", "acc") == 10
    await broker.aclose()


async def test_a_failed_handler_rolls_back_effect_and_claim(store: Store) -> None:
    """The first attempt writes its effect, then fails: the redelivery runs, one effect stays."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()
    invocations: Counter[str] = Counter()

    async def handle(body: Item, envelope: Envelope) -> None:
        invocations[envelope.id] += 1
        await current_transaction().execute(
            "INSERT INTO effects (message_id, amount) VALUES ($1, $2)", envelope.id, body.amount
        )
        if invocations[envelope.id] == 1:
            raise RuntimeError("after the effect, before the commit")

    ids = [f"f{n}" for n in range(5)]
    async with consuming(broker, store, handle, stats):
        for one in ids:
            await publish(broker, one)
        await wait_until(lambda: stats.claimed == 5, 20, what="5 messages handled")
    assert invocations == Counter(dict.fromkeys(ids, 2))
    assert stats.rolled_back == 5
    assert await effects(store) == Counter(dict.fromkeys(ids, 1))
    await broker.aclose()


async def test_a_rejected_message_leaves_no_effect_and_no_claim(store: Store) -> None:
    """Reject rolls back: the dead letter replayed later runs the handler again."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()
    reject = True

    async def handle(body: Item, envelope: Envelope) -> None:
        await current_transaction().execute(
            "INSERT INTO effects (message_id, amount) VALUES ($1, $2)", envelope.id, body.amount
        )
        if reject:
            raise Reject("not today")

    async with consuming(broker, store, handle, stats):
        await publish(broker, "r1")
        await wait_until(lambda: stats.rolled_back == 1, 10, what="the rejection")
        letters = await broker.dead_letters(group=GROUP)
        assert [letter.reason for letter in letters] == [DeadLetterReason.REJECTED]
        assert await effects(store) == Counter()
        reject = False
        await broker.replay([letters[0].id])
        await wait_until(lambda: stats.claimed == 1, 10, what="the replayed message handled")
    assert await effects(store) == Counter({"r1": 1})
    await broker.aclose()


async def test_concurrent_copies_in_two_consumers_apply_once(store: Store) -> None:
    """A lease runs out while the handler holds its claim: the other consumer's copy waits for
    the commit and is absorbed as a duplicate."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()
    invocations: Counter[str] = Counter()
    arrivals: Counter[str] = Counter()
    lease = 0.3

    def count_arrivals(app: ConsumeApp) -> ConsumeApp:
        async def counted(incoming: Incoming) -> None:
            arrivals[incoming.envelope.id] += 1  # before the inbox's claim
            await app(incoming)

        return counted

    async def handle(body: Item, envelope: Envelope) -> None:
        invocations[envelope.id] += 1
        await current_transaction().execute(
            "INSERT INTO effects (message_id, amount) VALUES ($1, $2)", envelope.id, body.amount
        )
        if envelope.id == "c0" and invocations["c0"] == 1:
            if store.dialect == "postgresql":
                # Hold the claim past the lease until the redelivered copy reaches the inbox
                # (where its claim waits for this commit), not for a guessed time.
                await wait_until(lambda: arrivals["c0"] >= 2, 20, what="a second copy of c0")
            else:
                # SQLite's transactions never overlap, so no copy can reach its claim while
                # this one is open: the fault is only to outlive the lease holding it.
                await asyncio.sleep(lease * 2.5)

    ids = [f"c{n}" for n in range(4)]
    async with consuming(
        broker, store, handle, stats, consumers=2, lease=lease, outer=count_arrivals, concurrency=2
    ):
        for one in ids:
            await publish(broker, one)

        async def done() -> bool:
            return stats.claimed == 4 and await backlog(broker) == 0

        await wait_until(done, 30, what="4 messages handled")
    assert await effects(store) == Counter(dict.fromkeys(ids, 1))
    assert stats.duplicates >= 1, "no copy was delivered while the first held its claim"
    assert all(count == 1 for count in invocations.values()), (invocations, stats)
    await broker.aclose()


async def test_prune_inbox_forgets_old_claims(store: Store) -> None:
    """Claims older than the retention are deleted; newer ones stay."""
    async with store.transaction() as tx:
        assert await tx.claim("g", "old")
        await tx.execute("UPDATE wirework_inbox SET handled_at = handled_at - 100000")
        assert await tx.claim("g", "new")
        assert await tx.claim("h", "old")
        await tx.execute(
            "UPDATE wirework_inbox SET handled_at = handled_at - 100000 WHERE consumer_group = $1",
            "h",
        )
    assert await prune_inbox(store, older_than=timedelta(hours=1), group="g") == 1
    assert await prune_inbox(store, older_than=timedelta(hours=1)) == 1
    async with store.transaction() as tx:
        assert not await tx.claim("g", "new")
        assert await tx.claim("g", "old")


async def test_when_limits_the_inbox_to_chosen_messages(store: Store) -> None:
    """With ``when``, other messages run without a transaction and without deduplication."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()
    seen: list[tuple[str, bool]] = []

    async def handle(body: Item, envelope: Envelope) -> None:
        try:
            current_transaction()
        except TransactionError:
            seen.append((envelope.id, False))
        else:
            seen.append((envelope.id, True))

    consumer = Consumer(
        broker,
        Subscription(topic=TOPIC, group=GROUP, prefetch=4),
        routes=[Route(ITEM, Item, handle)],
        middleware=[
            inbox_middleware(
                store, GROUP, stats=stats, when=lambda incoming: incoming.envelope.id == "kept"
            )
        ],
    )
    task = asyncio.create_task(consumer.run())
    await publish(broker, "kept", copies=2)
    await publish(broker, "plain", copies=2)
    await wait_until(lambda: len(seen) == 3 and stats.duplicates == 1, 10, what="4 deliveries")
    await consumer.stop()
    await task
    assert sorted(seen) == [("kept", True), ("plain", False), ("plain", False)]
    await broker.aclose()


async def test_events_published_in_a_handler_carry_its_lineage(store: Store) -> None:
    """A body published through the handler's transaction is caused by the handled message
    and shares its correlation; it commits with the claim."""
    await prepare(store)
    broker = MemoryBroker()
    stats = InboxStats()

    async def handle(body: Item, envelope: Envelope) -> None:
        await current_transaction().publish("downstream", Item(id=f"{body.id}-next"), source="/t")

    async with consuming(broker, store, handle, stats):
        await publish(broker, "cause")
        await wait_until(lambda: stats.claimed == 1, 10, what="the message handled")
    async with store.transaction() as tx:
        row = await tx.fetchrow("SELECT topic, headers FROM wirework_outbox")
    assert row is not None
    assert row["topic"] == "downstream"
    headers = orjson.loads(row["headers"])
    assert headers["ce-causationid"] == "cause"
    assert headers["ce-correlationid"] == "cause"
    await broker.aclose()
