"""How a settle's outcome reaches its caller on SQLite: counted when stale, raised when failed.

The writer hands a settle's outcome straight to the caller's future (no
future of its own in between), so these pin what that path must keep: a
stale settle returns and is counted, a current one is not counted, and an
error of the writer reaches the ``await``. Leases run on a manual clock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.resilience.driving import settle
from wirework.brokers import Delivery, Subscription
from wirework.brokers.base import GroupStats
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.clock import ManualClock
from wirework.envelope import WireMessage
from wirework.errors import BrokerBusyError

TOPIC = "orders"


def message(n: int) -> WireMessage:
    return WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}")


def sub(**options: object) -> Subscription:
    return Subscription.model_validate({"topic": TOPIC, "group": "g", **options})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def broker(tmp_path: Path, clock: ManualClock) -> AsyncIterator[SqliteBroker]:
    settings = SqliteSettings(busy_timeout=0.2)
    async with SqliteBroker(tmp_path / "b.db", settings=settings, clock=clock) as opened:
        yield opened


async def receive(deliveries: AsyncIterator[Delivery]) -> Delivery:
    return await asyncio.wait_for(anext(deliveries), timeout=5.0)


async def taken_again(
    deliveries: AsyncIterator[Delivery], broker: SqliteBroker, clock: ManualClock
) -> Delivery:
    """The next delivery, once the subscription's own pause (on the manual clock) is over.

    No sleeping: ``stats`` is answered after the claim the subscription has on its
    way (the writer keeps queue order), and then it waits on the clock alone.
    """
    waiting = asyncio.ensure_future(receive(deliveries))
    await settle()
    await broker.stats()
    await settle()
    wake = clock.next_deadline()
    assert wake is not None, "the subscription should be pausing on the clock"
    await clock.advance(max(0.0, wake - clock.monotonic()))
    return await waiting


async def row(broker: SqliteBroker) -> GroupStats:
    [found] = [r for r in await broker.stats() if r.group == "g"]
    return found


async def test_a_stale_ack_returns_is_counted_and_leaves_the_new_holder(
    broker: SqliteBroker, clock: ManualClock
) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub(lease_timeout=5, prefetch=2))
    late = await receive(deliveries)
    await clock.advance(5)
    current = await taken_again(deliveries, broker, clock)  # the lease ran out: the same message
    assert current.attempt == 2
    await late.ack()
    assert broker.stale_settles == 1
    assert (await row(broker)).in_flight == 1, "the stale ack removed the newer delivery"
    await current.ack()
    assert broker.stale_settles == 1
    assert (await row(broker)).backlog == 0
    await deliveries.aclose()


async def test_an_ack_the_writer_cannot_commit_raises_to_its_caller(
    broker: SqliteBroker, tmp_path: Path
) -> None:
    await broker.publish(TOPIC, message(1))
    deliveries = broker.subscribe(sub())
    delivery = await receive(deliveries)
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        acking = delivery.start_ack()
        assert acking is not None
        with pytest.raises(BrokerBusyError, match=r"busy_timeout=0\.2"):
            await asyncio.wait_for(acking, timeout=5.0)
        assert broker.stale_settles == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await row(broker)).in_flight == 1, "the failed ack changed nothing"
    await deliveries.aclose()
