"""Where the SQLite writer runs a transaction: on the loop when nothing can make it wait.

The loop runs a transaction itself when the writer's thread has nothing in
hand, every request is bounded and the write lock is free at once (under
strict, the WAL's sync follows on a thread of its own); anything else goes
to the thread. These pin each condition, the
order of transactions across the two, that the loop never waits for another
process's lock, that checkpoints run on the thread and keep the WAL bounded,
and that a step's bug neither hangs its callers nor leaves a transaction open.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from wirework.brokers import Subscription
from wirework.brokers import sqlite as sqlite_module
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.brokers.sqlite_writer import Batch, Writer
from wirework.envelope import WireMessage
from wirework.errors import BrokerError

TOPIC = "orders"


def where(connection: sqlite3.Connection, batch: Batch, requests: list[Any]) -> list[int]:
    """A step that writes nothing and answers the thread it ran on."""
    return [threading.get_ident()] * len(requests)


@contextlib.asynccontextmanager
async def open_broker(
    path: Path, durability: Literal["strict", "fast"]
) -> AsyncIterator[SqliteBroker]:
    settings = SqliteSettings(durability=durability, busy_timeout=2.0)
    async with SqliteBroker(path, settings=settings) as broker:
        # The thread opens the connection with the first transaction.
        await broker._submit(where, None)
        yield broker


@pytest.fixture
async def fast(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    async with open_broker(tmp_path / "fast.db", "fast") as broker:
        yield broker


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    async with open_broker(tmp_path / "strict.db", "strict") as broker:
        yield broker


async def ran_on(broker: SqliteBroker, **flags: bool) -> Literal["loop", "thread"]:
    ident = await broker._submit(where, None, **flags)
    return "loop" if ident == threading.get_ident() else "thread"


async def test_fast_runs_bounded_requests_on_the_loop(fast: SqliteBroker) -> None:
    assert await ran_on(fast, bounded=True) == "loop"
    assert await ran_on(fast, bounded=True, durable=False) == "loop"
    # Unbounded work (statistics, listings) never blocks the loop.
    assert await ran_on(fast) == "thread"
    assert await ran_on(fast, read_only=True) == "thread"


async def test_strict_runs_bounded_requests_on_the_loop_too(strict: SqliteBroker) -> None:
    # Durable ones too: the WAL's sync runs after the commit, on its own thread
    # (tests/unit/test_sqlite_wal_sync.py).
    assert await ran_on(strict, bounded=True) == "loop"
    assert await ran_on(strict, bounded=True, durable=False) == "loop"
    assert await ran_on(strict) == "thread"


async def test_publish_claim_and_ack_run_on_the_loop_under_fast(fast: SqliteBroker) -> None:
    writer = fast._started_writer()
    await fast.declare_group(Subscription(topic=TOPIC, group="g"))
    deliveries = fast.subscribe(Subscription(topic=TOPIC, group="g"))
    waiting = asyncio.ensure_future(anext(deliveries))
    # The first round includes the group and its doorbell: unbounded, the thread's.
    await fast.publish(TOPIC, WireMessage(headers={"ce-id": "m0"}, body=b"{}"))
    await (await asyncio.wait_for(waiting, timeout=5.0)).ack()
    on_the_thread, commits = writer.commits - writer.commits_here, writer.commits
    for n in range(1, 4):
        await fast.publish(TOPIC, WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}"))
        await (await asyncio.wait_for(anext(deliveries), timeout=5.0)).ack()
    assert writer.commits >= commits + 3
    assert writer.commits - writer.commits_here == on_the_thread
    await deliveries.aclose()


async def test_a_request_behind_the_threads_work_waits_its_turn(fast: SqliteBroker) -> None:
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def slow(connection: sqlite3.Connection, batch: Batch, requests: list[Any]) -> list[int]:
        entered.set()
        release.wait(5.0)
        order.append("slow")
        return [threading.get_ident()] * len(requests)

    def quick(connection: sqlite3.Connection, batch: Batch, requests: list[Any]) -> list[int]:
        order.append("quick")
        return [threading.get_ident()] * len(requests)

    first = fast._submit(slow, None)  # unbounded: the thread's
    assert await asyncio.to_thread(entered.wait, 5.0)  # the thread is inside it
    second = fast._submit(quick, None, bounded=True, durable=False)
    await asyncio.sleep(0)  # the loop iteration whose end flushes it
    await asyncio.sleep(0)
    assert order == []  # the bounded one did not run on the loop past the thread's
    assert not second.done()
    release.set()
    idents = await asyncio.gather(first, second)
    assert order == ["slow", "quick"]
    assert threading.get_ident() not in idents


async def test_the_loop_never_waits_for_another_process_lock(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "locked.db", "fast") as broker:
        holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            pending = broker._submit(where, None, bounded=True)
            await asyncio.sleep(0)  # the flush: tries here, finds the lock, hands it over
            await asyncio.sleep(0)
            assert time.monotonic() - started < 0.5  # not busy_timeout (2 s) on the loop
            assert not pending.done()
            holder.execute("ROLLBACK")
            ident = await asyncio.wait_for(pending, timeout=5.0)
        finally:
            holder.close()
        assert ident != threading.get_ident()  # the thread waited it out


@pytest.mark.parametrize("bounded", [True, False], ids=["on the loop", "on the thread"])
async def test_a_step_that_raises_fails_its_callers_and_leaves_no_transaction(
    fast: SqliteBroker, bounded: bool
) -> None:
    def broken(connection: sqlite3.Connection, batch: Batch, requests: list[Any]) -> list[int]:
        connection.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
        connection.execute("INSERT INTO scratch VALUES (1)")
        raise KeyError("a bug in a step")

    with pytest.raises(BrokerError, match="step failed: KeyError"):
        await asyncio.wait_for(fast._submit(broken, None, bounded=bounded), timeout=5.0)
    # Rolled back: the next transaction begins, and the insert is gone with the table.
    assert await ran_on(fast, bounded=bounded) == ("loop" if bounded else "thread")

    def count(connection: sqlite3.Connection, batch: Batch, requests: list[Any]) -> list[int]:
        exists = connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'scratch'"
        ).fetchone()[0]
        return [exists] * len(requests)

    assert await fast._submit(count, None) == 0


async def test_checkpoints_run_on_the_thread_and_bound_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "FAST_CHECKPOINT_PAGES", 50)
    where_checkpointed: list[int] = []
    checkpoint = Writer._checkpoint

    def watched(self: Writer, connection: sqlite3.Connection) -> None:
        where_checkpointed.append(threading.get_ident())
        checkpoint(self, connection)

    monkeypatch.setattr(Writer, "_checkpoint", watched)
    path = tmp_path / "wal.db"
    body = b"x" * 1024
    async with open_broker(path, "fast") as broker:
        deliveries = broker.subscribe(Subscription(topic=TOPIC, group="g", start="earliest"))
        for start in range(0, 3_000, 100):
            await asyncio.gather(
                *(
                    broker.publish(TOPIC, WireMessage(headers={"ce-id": f"m{n}"}, body=body))
                    for n in range(start, start + 100)
                )
            )
            for _ in range(100):
                delivery = await asyncio.wait_for(anext(deliveries), timeout=5.0)
                await delivery.ack()
        await deliveries.aclose()
        writer = broker._started_writer()
        assert writer.commits_here > writer.commits // 2  # the loop did most of the work
        # Before the close, which checkpoints and deletes it. A WAL is reused from its
        # start after a checkpoint, never shrunk: its size is its high-water mark.
        wal_bytes = (path.parent / (path.name + "-wal")).stat().st_size
    assert len(where_checkpointed) >= 5
    assert threading.get_ident() not in where_checkpointed
    # 3,000 rows of 1 KiB, each written, claimed and deleted: ~40 MiB of WAL unchecked.
    assert wal_bytes < 4 * 1024 * 1024
