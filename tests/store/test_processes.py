"""Real processes over one store and one broker: the inbox and relay under faults.

The two-consumer test runs over the SQLite broker on both stores, and over
Redis, RabbitMQ and NATS on PostgreSQL (where a redelivered copy really
overlaps its first handler); the relay test over SQLite, where the test reads
the broker's backlog between the two relays.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.helpers.store_worker import GROUP, ITEM_TYPE, TOPIC, LedgerItem, redelivered
from tests.store.brokers import BOTH, SERVERS, backend, duplicating, matrix, on
from tests.store.workers import EFFECTS, StoreRun, backlog, effects, polling
from wirework.brokers import connect
from wirework.brokers.base import GroupAdmin, Subscription
from wirework.consumer import ConsumeApp, Consumer, Incoming, Route
from wirework.envelope import Envelope, encode_binary
from wirework.faults import EXIT_CODE
from wirework.store import InboxStats, connect_store, current_transaction, inbox_middleware
from wirework.testing.conformance import wait_until


def item(message_id: str, key: str | None = None) -> Envelope:
    return Envelope.new(
        ITEM_TYPE, LedgerItem(id=message_id), source="/tests", id=message_id, key=key
    )


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize(BOTH, matrix(both=["sqlite"], postgresql=SERVERS), indirect=True)
async def test_two_processes_never_apply_a_redelivered_message_twice(
    store_url: str, run: StoreRun
) -> None:
    """Two consumer processes, each message published twice, some handlers holding their claim
    past the lease so the other process gets a redelivered copy meanwhile: one effect per id."""
    ids = [f"m-{n}" for n in range(40)]
    on_sqlite = store_url.startswith("sqlite")
    # The fault: a slow handler holds its claim past the lease. On SQLite the holder's
    # transaction keeps the other process waiting, so a fixed hold suffices. On PostgreSQL
    # the hold lasts until a redelivered copy was received (deadline 30 s), and there are
    # more handlers than slow ids can tie up: a holder, its second published copy and the
    # copies of that copy all wait on one claim, and with every handler waiting no copy
    # could be received while the claim is held (a landing CI run failed so, with 4 slow
    # ids over 2 x 2 handlers).
    slow = ids[::10] if on_sqlite else ids[::20]
    options = [
        "--lease=0.5",
        f"--slow={','.join(slow)}",
        *(
            ["--concurrency=2", "--hold=1.2"]
            if on_sqlite
            else ["--concurrency=6", "--hold=30", "--hold-until-copy"]
        ),
    ]
    publisher = connect(duplicating(run.broker_url))
    async with connect_store(store_url) as store, publisher as broker:
        async with store.transaction() as tx:
            await tx.execute(EFFECTS)
        assert isinstance(broker, GroupAdmin)
        await broker.declare_group(Subscription(topic=TOPIC, group=GROUP, lease_timeout=0.5))
        workers = [run.start("consume", name, options) for name in ("a", "b")]
        await wait_until(
            lambda: all(run.started(w) for w in workers), 30, what="both consumers started"
        )
        for one in ids:
            message = encode_binary(item(one))
            await broker.publish(TOPIC, message)
            await broker.publish(TOPIC, message)

        @polling
        async def done() -> bool:
            return len(await effects(store)) == len(ids) and await backlog(broker) == 0

        await wait_until(done, 90, what=f"every id effected and the broker empty\n{run.describe()}")
        for worker in workers:
            worker.terminate()
        for worker in workers:
            assert await worker.exited(30) == 0, run.describe()
        counted = await effects(store)

    history = run.history()
    invoked = history.counts("invoked")
    duplicates = sum(int(r.fields["duplicates"]) for r in history.of("inbox"))
    overlapping = concurrent_copies(run, slow)
    shown = f"duplicates={duplicates} concurrent_copies={overlapping}"
    print(f"LEDGER inbox-2proc[{backend(run.broker_url)}]: {shown}")
    assert counted == Counter(dict.fromkeys(ids, 1)), counted - Counter(dict.fromkeys(ids, 1))
    assert invoked == Counter(dict.fromkeys(ids, 1)), "a handler ran twice for one id"
    assert duplicates >= len(ids), "the second copies were not absorbed as duplicates"
    if not on_sqlite:
        # On SQLite the holder's transaction keeps every other process's transactions (and so
        # their workers) waiting, so copies arrive after it; PostgreSQL locks only the claim.
        assert overlapping, "no redelivered copy arrived while its first handler held the claim"


def concurrent_copies(run: StoreRun, slow: list[str]) -> list[str]:
    """Slow ids of which a redelivered copy (attempt 2+) was received while the first
    handler held its claim, in either process."""
    history = run.history()
    found = []
    for one in slow:
        holding = [r.at for r in history.of("holding") if r.id == one]
        handled = [r.at for r in history.of("handled") if r.id == one]
        if not holding or not handled:
            continue
        copies = [r.at for r in history.of("received") if redelivered(r, one)]
        if any(holding[0] < at < handled[0] for at in copies):
            found.append(one)
    return found


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("broker_url", on("sqlite"), indirect=True)
async def test_a_relay_killed_between_publish_and_mark_republishes_the_same_ids(
    store_url: str, run: StoreRun
) -> None:
    """The relay dies after publishing and before deleting its rows; its successor publishes
    them again with the same ids, in order per key, and an inbox absorbs every copy."""
    keys = ["k0", "k1", "k2"]
    committed: dict[str, list[str]] = {key: [] for key in keys}
    async with connect_store(store_url) as store, connect(run.broker_url) as broker:
        async with store.transaction() as tx:
            await tx.execute(EFFECTS)
        for n in range(12):
            key = keys[n % 3]
            async with store.transaction() as tx:
                await tx.publish(TOPIC, item(f"o-{n}", key=key))
            committed[key].append(f"o-{n}")

        victim = run.start("relay", "r1", env={"FAULT_POINT": "outbox.after_publish_before_mark"})
        assert await victim.exited(30) == EXIT_CODE, run.describe()
        async with store.transaction() as tx:
            assert await tx.fetchval("SELECT count(*) FROM wirework_outbox") == 12
        assert await backlog(broker) == 12

        survivor = run.start("relay", "r2")

        @polling
        async def outbox_empty() -> bool:
            async with store.transaction() as tx:
                return int(await tx.fetchval("SELECT count(*) FROM wirework_outbox")) == 0

        await wait_until(outbox_empty, 30, what=f"the successor to relay\n{run.describe()}")
        survivor.terminate()
        assert await survivor.exited(30) == 0, run.describe()
        assert await backlog(broker) == 24

        deliveries: list[Envelope] = []

        def counting(app: ConsumeApp) -> ConsumeApp:
            async def count(incoming: Incoming) -> None:
                deliveries.append(incoming.envelope)
                await app(incoming)

            return count

        async def handle(body: LedgerItem, envelope: Envelope) -> None:
            await current_transaction().execute(
                "INSERT INTO effects (message_id, process) VALUES ($1, $2)", envelope.id, "test"
            )

        stats = InboxStats()
        consumer = Consumer(
            broker,
            Subscription(topic=TOPIC, group=GROUP, prefetch=1),
            routes=[Route(ITEM_TYPE, LedgerItem, handle)],
            middleware=[counting, inbox_middleware(store, GROUP, stats=stats)],
        )
        consuming = asyncio.create_task(consumer.run())
        await wait_until(lambda: len(deliveries) == 24, 30, what="24 deliveries")
        await consumer.stop()
        await consuming
        counted = await effects(store)

    ids = [one for key in keys for one in committed[key]]
    assert Counter(e.id for e in deliveries) == Counter(dict.fromkeys(ids, 2))
    assert counted == Counter(dict.fromkeys(ids, 1))
    assert (stats.claimed, stats.duplicates) == (12, 12)
    for key in keys:
        first_seen = list(dict.fromkeys(e.id for e in deliveries if e.key == key))
        assert first_seen == committed[key], key
