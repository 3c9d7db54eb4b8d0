"""Acks the SQLite broker does not sync: what can undo one, and what follows.

A transaction of acks alone commits without an fsync (docs/backends/sqlite.md).
An ack that never commits, because it failed or because its process died
before the commit, must bring the message back after its lease: redelivered,
never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from wirework.brokers.base import Delivery, Subscription
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import BrokerBusyError
from wirework.testing.conformance import wait_until

TOPIC = "acks.window"
LEASE = 1.0
DEADLINE = 15.0

_CHILD = """
import asyncio, sys
from wirework.brokers.base import Subscription
from wirework.brokers.sqlite import SqliteBroker

async def main(db: str) -> None:
    broker = SqliteBroker(db)
    subscription = Subscription(topic=sys.argv[2], group="g", lease_timeout=float(sys.argv[3]),
                                prefetch=1)
    delivery = await anext(broker.subscribe(subscription))
    print("got", delivery.message.message_id, flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print("acking", flush=True)
    await delivery.ack()
    await asyncio.Event().wait()  # until the test kills it

asyncio.run(main(sys.argv[1]))
"""


class Item(BaseModel):
    n: int


def message(n: int) -> WireMessage:
    return encode_binary(Envelope.new("acks.item", Item(n=n), source="/tests", id=f"m{n}"))


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold the file's write lock from a plain connection, as another process would."""
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def pending_rows(db: Path) -> int:
    connection = sqlite3.connect(db)
    try:
        return int(connection.execute("SELECT COUNT(*) FROM ww_deliveries").fetchone()[0])
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def taking(broker: SqliteBroker) -> AsyncIterator[AsyncIterator[Delivery]]:
    subscription = Subscription(topic=TOPIC, group="g", lease_timeout=LEASE, prefetch=1)
    async with contextlib.aclosing(broker.subscribe(subscription)) as deliveries:
        yield deliveries


@pytest.mark.fault
async def test_an_ack_that_fails_to_commit_raises_and_its_message_comes_back(
    tmp_path: Path,
) -> None:
    """An ack whose commit fails on a locked file raises; the lease brings the message back."""
    db = tmp_path / "b.db"
    async with SqliteBroker(db, settings=SqliteSettings(busy_timeout=0.3)) as broker:
        await broker.publish(TOPIC, message(1))
        async with taking(broker) as deliveries:
            first = await anext(deliveries)
            with write_lock(db), pytest.raises(BrokerBusyError):
                await first.ack()
            assert first.settled
            async with asyncio.timeout(DEADLINE):
                again = await anext(deliveries)
            assert (again.message.message_id, again.attempt) == ("m1", 2)
            await again.ack()
        await wait_until(lambda: pending_rows(db) == 0, DEADLINE, what="the second ack committed")
        assert broker.stale_settles == 0


@pytest.mark.fault
async def test_a_process_killed_between_ack_and_commit_gets_its_message_redelivered(
    tmp_path: Path,
) -> None:
    """A consumer that dies with its ack queued but not committed: the message is not lost."""
    db = tmp_path / "b.db"
    async with SqliteBroker(db) as broker:
        await broker.publish(TOPIC, message(1))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(db),
            TOPIC,
            str(LEASE),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            async with asyncio.timeout(DEADLINE):
                assert (await child.stdout.readline()).split() == [b"got", b"m1"]
            with write_lock(db):  # the child's ack cannot commit now
                child.stdin.write(b"go\n")
                async with asyncio.timeout(DEADLINE):
                    assert (await child.stdout.readline()).strip() == b"acking"
                child.kill()
                assert await child.wait() == -9
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert pending_rows(db) == 1, "the killed child's ack was committed after all"
        async with taking(broker) as deliveries:
            async with asyncio.timeout(DEADLINE):
                again = await anext(deliveries)
            assert (again.message.message_id, again.attempt) == ("m1", 2)
            await again.ack()
        await wait_until(lambda: pending_rows(db) == 0, DEADLINE, what="the second ack committed")


@pytest.mark.fault
async def test_acks_commit_without_an_fsync_and_publishes_with_one(tmp_path: Path) -> None:
    """Under strict, a transaction of acks alone is not synced; one holding a publish is."""
    db = tmp_path / "b.db"
    async with SqliteBroker(db) as broker:
        await broker.publish(TOPIC, message(1))
        async with taking(broker) as deliveries:
            first = await anext(deliveries)
            synced, (commits, _) = broker.synced_commits, broker.commit_counts
            await first.ack()
            await wait_until(lambda: pending_rows(db) == 0, DEADLINE, what="the ack committed")
            assert broker.commit_counts[0] > commits
            assert broker.synced_commits == synced, "an ack-only transaction was synced"
            await broker.publish(TOPIC, message(2))
            assert broker.synced_commits == synced + 1
            second = await anext(deliveries)
            assert second.message.message_id == "m2"
            await second.ack()
        await wait_until(lambda: pending_rows(db) == 0, DEADLINE, what="the last ack committed")
