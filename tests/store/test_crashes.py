"""Crash points fired in real worker processes (RELIABILITY.md §2.0): the ledger checks.

DEV-01, DEV-02: inbox consumers dying after the commit and before the ack,
after the effect and before the commit, and right after the claim; each is
restarted. DEV-14: a service dying right after committing an order and its
outbox row, before its relay ran, 5 times; plus a final ``kill -9``. The
effects table (no unique constraint) is the oracle of committed effects.

The store-by-broker matrix, chosen to keep the suite affordable on two cores
(a worker process start costs 1-4 s there, and each crash is one):

* SQLite broker, both stores: every crash point, ``after_commit_before_ack``
  with the three seeds, and DEV-14;
* Redis, RabbitMQ, NATS: ``after_commit_before_ack`` (DEV-01) on both
  stores; ``after_effect_write`` (DEV-02) and DEV-14 on PostgreSQL, seed 1.
  ``after_inbox_claim`` rolls back exactly as ``after_effect_write`` does
  (the store's part), so it runs on SQLite only.

The memory broker cannot span processes, so none of these run on it; the
in-process cases (DEV-06 in ``test_duplicates.py``, DEV-15 in
``test_ghosts.py``) do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.harness import SEEDS, Supervisor, Worker, report
from tests.helpers.store_worker import GROUP, ITEM_TYPE, TOPIC, LedgerItem, item
from tests.store.brokers import BOTH, SERVERS, backend, case, matrix
from tests.store.workers import EFFECTS, StoreRun, backlog, effects, polling
from wirework.brokers import Broker, connect
from wirework.brokers.base import GroupAdmin, Subscription
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, encode_binary
from wirework.faults import EXIT_CODE
from wirework.store import InboxStats, connect_store, current_transaction, inbox_middleware
from wirework.testing.conformance import wait_until
from wirework.testing.ledger import SUFFIX, LedgerFile, check

MESSAGES = 120

AFTER_COMMIT = "consume.after_commit_before_ack"
AFTER_EFFECT = "consume.after_effect_write"
AFTER_CLAIM = "consume.after_inbox_claim"

CRASH_CASES = [
    *(
        row
        for seed in SEEDS
        for row in matrix(AFTER_COMMIT, seed, id=f"after_commit_before_ack-{seed}", both=["sqlite"])
    ),
    *matrix(AFTER_EFFECT, 1, id="after_effect_write-1", both=["sqlite"]),
    *matrix(AFTER_CLAIM, 1, id="after_inbox_claim-1", both=["sqlite"]),
    *matrix(AFTER_COMMIT, 1, id="after_commit_before_ack-1", both=SERVERS),
    *(case("postgresql", broker, AFTER_EFFECT, 1, id="after_effect_write-1") for broker in SERVERS),
]


async def declare(broker: Broker) -> None:
    """Create the workers' group before anything is published (RabbitMQ keeps nothing for a
    group that does not exist yet)."""
    assert isinstance(broker, GroupAdmin)
    await broker.declare_group(Subscription(topic=TOPIC, group=GROUP, lease_timeout=1.0))


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize((*BOTH, "point", "seed"), CRASH_CASES, indirect=BOTH)
async def test_inbox_consumers_crashing_at_a_point_apply_each_message_once(
    store_url: str, broker_url: str, tmp_path: Path, point: str, seed: int
) -> None:
    """Two inbox consumers crash at ``point`` every few messages and are restarted:
    nothing acked is lost, and no message has two effects."""
    rng = random.Random(seed)
    store_run = StoreRun(tmp_path, store_url, broker_url)
    try:
        async with connect_store(store_url) as store, connect(broker_url) as broker:
            async with store.transaction() as tx:
                await tx.execute(EFFECTS)
            await declare(broker)
            with LedgerFile(store_run.ledger / f"p0.{os.getpid()}{SUFFIX}") as ledger:
                for n in range(MESSAGES):
                    message_id = f"p0-{n}"
                    ledger.record("invoke", message_id)
                    await broker.publish(TOPIC, encode_binary(item(message_id)))
                    ledger.record("ok", message_id)

            def start(name: str) -> Worker:
                every = rng.randint(8, 25)
                env = {"FAULT_POINT": point, "FAULT_EVERY": str(every)}
                return store_run.start("consume", name, ["--concurrency=1"], env=env)

            supervisor = Supervisor(start, ("c0", "c1"))
            supervising = asyncio.create_task(supervisor.run())
            try:

                @polling
                async def drained() -> bool:
                    return len(await effects(store)) == MESSAGES and await backlog(broker) == 0

                await wait_until(drained, 90, what=f"the drain\n{store_run.describe()}")
            finally:
                supervisor.stop()
                await supervising
            counted = await effects(store)
    finally:
        store_run.kill_all()

    history = store_run.history()
    result = dataclasses.replace(check(history), effects=counted)
    crashed = [worker for worker, code in supervisor.exits if code == EXIT_CODE]
    others = [(worker.name, code) for worker, code in supervisor.exits if code != EXIT_CODE]
    report(f"inbox-crash[{backend(broker_url)},{point},seed={seed}]", result, crashes=len(crashed))
    assert not others, f"workers exited for another reason: {others}\n{store_run.describe()}"
    assert len(crashed) >= 2, f"expected several crashes\n{store_run.describe()}"
    assert not result.lost, str(result)
    assert not result.unexpected, str(result)
    assert not result.dup_effects, str(result)
    assert not result.failed_but_present, str(result)
    # Each crash strands the one message its worker was in; it comes back and is applied once.
    received = history.counts("received")
    for worker in crashed:
        process = f"{worker.name}.{worker.pid}"
        began = history.ids("received", process=process)
        ended = history.ids("acked", process=process)
        stranded = began - ended
        assert len(stranded) == 1, f"{process} stranded {sorted(stranded)}"
        (one,) = stranded
        assert received[one] >= 2, f"{one} was not redelivered"
        assert counted[one] == 1


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize(BOTH, matrix(both=["sqlite"], postgresql=SERVERS), indirect=True)
async def test_a_service_crashing_between_commit_and_relay_loses_no_event(
    store_url: str, broker_url: str, tmp_path: Path
) -> None:
    """DEV-14: a producer dies right after each few commits, before its relay runs; restarted,
    then killed -9 mid-stream; a relay drains: orders == published ids == downstream effects."""
    rng = random.Random(7)
    store_run = StoreRun(tmp_path, store_url, broker_url)
    try:
        async with connect_store(store_url) as store, connect(broker_url) as broker:
            async with store.transaction() as tx:
                await tx.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
                await tx.execute(EFFECTS)
            await declare(broker)

            def start(name: str) -> Worker:
                env = {
                    "FAULT_POINT": "outbox.after_commit_before_relay",
                    "FAULT_EVERY": str(rng.randint(3, 8)),
                }
                return store_run.start("produce", name, ["--count=1000"], env=env)

            supervisor = Supervisor(start, ("p",))
            supervising = asyncio.create_task(supervisor.run())
            try:
                await wait_until(
                    lambda: sum(code == EXIT_CODE for _, code in supervisor.exits) >= 5,
                    90,
                    what=f"five crashes after commit\n{store_run.describe()}",
                )
            finally:
                supervisor.stop()
                await supervising
            last = supervisor.current["p"]
            last.kill()  # a real kill -9, wherever it is
            await last.exited(10)
            drainer = store_run.start("relay", "drain")

            @polling
            async def outbox_empty() -> bool:
                async with store.transaction() as tx:
                    rows = await tx.fetchval("SELECT count(*) FROM wirework_outbox")
                return int(rows) == 0

            await wait_until(outbox_empty, 30, what=f"the drain\n{store_run.describe()}")
            drainer.terminate()
            assert await drainer.exited(20) == 0, store_run.describe()

            stats = InboxStats()
            delivered: Counter[str] = Counter()

            async def handle(body: LedgerItem, envelope: Envelope) -> None:
                delivered[envelope.id] += 1
                await current_transaction().execute(
                    "INSERT INTO effects (message_id, process) VALUES ($1, $2)", body.id, "down"
                )

            consumer = Consumer(
                broker,
                Subscription(topic=TOPIC, group=GROUP, prefetch=10),
                routes=[Route(ITEM_TYPE, LedgerItem, handle)],
                concurrency=4,
                middleware=[inbox_middleware(store, GROUP, stats=stats)],
            )
            consuming = asyncio.create_task(consumer.run())

            async def consumed() -> bool:
                return await backlog(broker) == 0

            await wait_until(consumed, 30, what="the downstream drain")
            await consumer.stop()
            await consuming
            async with store.transaction() as tx:
                orders = {row["id"] for row in await tx.fetch("SELECT id FROM orders")}
            counted = await effects(store)
    finally:
        store_run.kill_all()

    history = store_run.history()
    result = dataclasses.replace(check(history), effects=counted)
    crashed = [worker for worker, code in supervisor.exits if code == EXIT_CODE]
    report(
        f"outbox-crash[{backend(broker_url)},after_commit_before_relay]",
        result,
        crashes=len(crashed),
    )
    assert len(crashed) >= 5
    assert orders == set(delivered) == set(counted), "zombie or ghost: sets differ"
    assert not result.dup_effects, str(result)
    assert not result.lost, str(result)
    assert not result.unexpected, str(result)
    assert not result.failed_but_present, str(result)
    for worker in crashed:
        process = f"{worker.name}.{worker.pid}"
        unfinished = history.ids("invoke", process=process) - history.ids("ok", process=process)
        assert len(unfinished) == 1, f"{process}: {sorted(unfinished)}"
        assert unfinished <= orders, "the order committed just before the crash was lost"
    assert len(result.recovered) >= len(crashed)
