"""DEV-04 with the inbox: SIGTERM to an inbox consumer process under load.

The consumer (``tests.helpers.store_worker consume``) has prefetch 10, four
handlers, and each handler sleeps 0.5 s inside its inbox transaction after
writing its effect. On SIGTERM it must stop fetching, finish or hand back
what it holds within the grace, and exit 0 within grace + 1 s; a handler cut
off by the grace rolls back its effect and claim, and its message is nacked.
A successor drains the rest, well within the 60 s lease (so what comes back
was handed back, not timed out): nothing acked by the publisher is lost, what
the first consumer held comes back, and no id has two effect rows.

Two graces: 5 s (RELIABILITY.md's ``shutdown_grace``; every handler
finishes) and 0.2 s (handlers are cut off and handed back). Both run over the
SQLite broker on both stores; the cut-off case also over Redis, RabbitMQ and
NATS on PostgreSQL. The memory broker cannot be shared with a process.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from tests.helpers.harness import report
from tests.helpers.store_worker import GROUP, TOPIC, item
from tests.store.brokers import BOTH, SERVERS, backend, matrix
from tests.store.workers import EFFECTS, StoreRun, backlog, effects, polling
from wirework.brokers import Broker, Inspectable, connect
from wirework.brokers.base import GroupAdmin, Subscription
from wirework.envelope import encode_binary
from wirework.store import connect_store
from wirework.testing.conformance import wait_until
from wirework.testing.ledger import SUFFIX, History, LedgerFile, check

MESSAGES = 100
PREFETCH = 10
CONCURRENCY = 4
HANDLER_SLEEP = 0.5
#: Long, so that whatever comes back was handed back, not timed out: the successor's
#: drain must end well within it.
LONG_LEASE = 60.0
DRAIN_DEADLINE = 40.0
#: Brokers whose ``stats()`` see what another process holds: RabbitMQ counts only its own
#: object's deliveries, and NATS counts a message handed back without a delay as in flight
#: until it is taken again (both documented LIMITS of those backends).
EXACT_IN_FLIGHT = ("sqlite", "redis")

CASES = [
    *matrix(0.2, id="hand-back-after-grace", both=["sqlite"], postgresql=SERVERS),
    *matrix(5.0, id="finish-in-grace", both=["sqlite"]),
]


async def in_flight(broker: Broker) -> int:
    assert isinstance(broker, Inspectable)
    return sum(row.in_flight for row in await broker.stats() if row.topic == TOPIC)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize((*BOTH, "grace"), CASES, indirect=BOTH)
async def test_sigterm_to_an_inbox_consumer_finishes_or_hands_back_its_work(
    store_url: str, broker_url: str, run: StoreRun, grace: float
) -> None:
    """SIGTERM under load: no fetch after it, exit 0 within grace + 1 s, what was held comes
    back to the successor, nothing lost, one effect per id."""
    options = [
        f"--lease={LONG_LEASE}",
        f"--prefetch={PREFETCH}",
        f"--concurrency={CONCURRENCY}",
        f"--handler-sleep={HANDLER_SLEEP}",
        f"--grace={grace}",
    ]
    async with connect_store(store_url) as store, connect(broker_url) as broker:
        async with store.transaction() as tx:
            await tx.execute(EFFECTS)
        assert isinstance(broker, GroupAdmin)
        await broker.declare_group(Subscription(topic=TOPIC, group=GROUP, lease_timeout=LONG_LEASE))
        with LedgerFile(run.ledger / f"p0.{os.getpid()}{SUFFIX}") as ledger:
            for n in range(MESSAGES):
                message_id = f"p0-{n}"
                ledger.record("invoke", message_id)
                await broker.publish(TOPIC, encode_binary(item(message_id)))
                ledger.record("ok", message_id)

        consumer = run.start("consume", "c0", options)
        process = f"c0.{consumer.pid}"

        def loaded() -> bool:
            return len(run.history().of("invoked", process=process)) >= 3

        await wait_until(loaded, 30, what=f"the consumer under load\n{run.describe()}")

        sent = time.monotonic()
        consumer.terminate()
        code = await consumer.exited(grace + 10)
        took = time.monotonic() - sent
        left_leased = await in_flight(broker)

        history = run.history()
        (stopping,) = [r.at for r in history.of("stopping", process=process)]
        phases = {r.kind: round(r.at - stopping, 3) for r in history.of("stopped", "closed")}
        before = History(tuple(r for r in history.records if r.at < stopping))
        held = before.ids("received", process=process) - before.ids("acked", process=process)
        late = [r.id for r in history.of("received", process=process) if r.at > stopping]
        taken = history.ids("received", process=process)
        unfinished = history.ids("invoked", process=process) - history.ids("acked", process=process)
        unacked = taken - history.ids("acked", process=process)
        handed_back = history.ids("nacked", process=process)

        successor = run.start("consume", "c1", [f"--lease={LONG_LEASE}", "--concurrency=4"])

        @polling
        async def drained() -> bool:
            return len(await effects(store)) == MESSAGES and await backlog(broker) == 0

        began = time.monotonic()
        await wait_until(drained, DRAIN_DEADLINE, what=f"the successor's drain\n{run.describe()}")
        drain_s = time.monotonic() - began
        successor.terminate()
        assert await successor.exited(20) == 0, run.describe()
        counted = await effects(store)

    history = run.history()
    result = dataclasses.replace(check(history), effects=counted)
    report(
        f"inbox-sigterm[{backend(broker_url)},grace={grace}]",
        result,
        exit_s=took,
        held=len(held),
        drain_s=drain_s,
        unfinished=len(unfinished),
        unacked=len(unacked),
        left_leased=left_leased,
    )
    assert held, "nothing was in flight at SIGTERM"
    assert code == 0, run.describe()
    assert took <= grace + 1.0, f"exit took {took:.3f} s: {phases}"
    assert not late, f"the consumer fetched after SIGTERM: {late}"
    if grace > CONCURRENCY * HANDLER_SLEEP:
        assert not unfinished, "a handler running at SIGTERM did not finish within grace"
    else:
        assert unfinished, "no handler was running at SIGTERM"
        assert unfinished <= handed_back, "a cut-off handler's message was not nacked"
    if backend(broker_url) in EXACT_IN_FLIGHT:
        assert left_leased == 0, "deliveries stayed leased after exit instead of being handed back"
    received_after = history.ids("received", process=f"c1.{successor.pid}")
    assert unacked <= received_after, f"held, never acked, not back: {unacked - received_after}"
    assert not result.lost, str(result)
    assert not result.unexpected, str(result)
    assert not result.dup_effects, str(result)
    assert not result.failed_but_present, str(result)
    assert result.redeliveries <= PREFETCH, str(result)
