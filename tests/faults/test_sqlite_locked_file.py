"""Another process holding the SQLite file's write lock (RELIABILITY.md DEV-05, shortened)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.helpers.harness import FaultRun, report
from tests.helpers.ledger_worker import GROUP, TOPIC, item
from wirework.brokers.base import Delivery, Subscription
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.errors import BrokerBusyError
from wirework.testing.conformance import wait_until

BUSY_TIMEOUT = 1.0
HOLD = 4.0


def integrity(db: Path) -> str:
    connection = sqlite3.connect(db)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


@pytest.mark.fault
async def test_locked_file_fails_publishes_fast_stores_nothing_and_recovers(run: FaultRun) -> None:
    """While another process holds the lock, publish fails fast and stores nothing; all resumes."""
    consumer = run.consumer("c0", prefetch=20, concurrency=4, busy_timeout=BUSY_TIMEOUT)
    publisher = run.publisher("p0", count=1_000_000, rate=200, tasks=4, busy_timeout=BUSY_TIMEOUT)
    await wait_until(lambda: len(run.records_of(publisher, "ok")) >= 100, 20, what="publishing")

    locker = run.locker("locker", hold=HOLD)
    await wait_until(lambda: bool(run.records_of(locker, "locked")), 10, what="the lock taken")
    assert await locker.exited(HOLD + 10) == 0, run.describe()
    (locked_at,) = run.records_of(locker, "locked")
    (released_at,) = run.records_of(locker, "released")

    def published_after_release() -> int:
        return sum(1 for at in run.records_of(publisher, "ok") if at > released_at)

    await wait_until(lambda: published_after_release() >= 200, 20, what="publishing again")
    publisher.terminate()
    assert await publisher.exited(10) == 0, run.describe()
    consumer_survived = consumer.alive
    result = await run.drain()

    history = run.history()
    outcomes = history.of("ok", "fail", "info")
    slowest = max(float(r.fields["dt"]) for r in outcomes)
    busy = [r for r in history.of("fail") if r.fields.get("error") == "BrokerBusyError"]
    first_ok = min(r.at for r in history.of("ok") if r.at > released_at)
    first_ack = min((r.at for r in history.of("acked") if r.at > released_at), default=1e9)
    acks_while_locked = [r for r in history.of("acked") if locked_at < r.at < released_at]
    report(
        "locked-file",
        result,
        busy_errors=len(busy),
        max_call_s=slowest,
        publish_resumed_after_s=first_ok - released_at,
        consume_resumed_after_s=first_ack - released_at,
        acks_while_locked=len(acks_while_locked),
        acks_failed_busy=len(history.of("ack_failed")),
    )
    assert busy, "no publish failed with BrokerBusyError while the file was locked"
    assert slowest <= BUSY_TIMEOUT + 0.5, f"a publish call blocked {slowest:.3f} s"
    assert first_ok - released_at <= 1.0, "publishing did not resume within 1 s of the release"
    assert consumer_survived, f"the consumer died of the lock\n{run.describe()}"
    assert first_ack - released_at <= 1.5, "consuming did not resume after the release"
    assert await asyncio.to_thread(integrity, run.db) == "ok"
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    assert not result.failed_but_present, str(result)
    assert result.effected == result.acked, str(result)


@pytest.mark.fault
async def test_subscription_outlives_a_lock_held_past_busy_timeout(run: FaultRun) -> None:
    """A subscription waiting while another process holds the lock keeps going after release."""
    settings = SqliteSettings(busy_timeout=0.3, poll_interval=0.1)
    broker = SqliteBroker(run.db, settings=settings)
    deliveries = broker.subscribe(Subscription(topic=TOPIC, group=GROUP, lease_timeout=1.0))
    try:
        await broker.publish(TOPIC, item("before"))
        first = await asyncio.wait_for(anext(deliveries), 5)
        await first.ack()

        locker = run.locker("locker", hold=1.5)
        await wait_until(lambda: bool(run.records_of(locker, "locked")), 10, what="the lock taken")
        # Claims hit the lock now, several times over busy_timeout.
        waiting: asyncio.Future[Delivery] = asyncio.ensure_future(anext(deliveries))
        assert await locker.exited(10) == 0, run.describe()
        await broker.publish(TOPIC, item("after"))
        second = await asyncio.wait_for(waiting, 5)
        assert second.message.message_id == "after"
        await second.ack()
    finally:
        await deliveries.aclose()
        await broker.aclose()


@pytest.mark.fault
async def test_broker_first_opened_under_a_lock_works_once_it_is_released(run: FaultRun) -> None:
    """BrokerBusyError on opening a locked file passes: the same broker works after release."""
    locker = run.locker("locker", hold=1.0)  # creates the file and locks it before any broker
    await wait_until(lambda: bool(run.records_of(locker, "locked")), 10, what="the lock taken")
    broker = SqliteBroker(run.db, settings=SqliteSettings(busy_timeout=0.2))
    try:
        with pytest.raises(BrokerBusyError):
            await broker.publish(TOPIC, item("during"))
        assert await locker.exited(10) == 0, run.describe()
        await broker.publish(TOPIC, item("after"))
        assert (await broker.stats())[0].ready == 1
    finally:
        await broker.aclose()
