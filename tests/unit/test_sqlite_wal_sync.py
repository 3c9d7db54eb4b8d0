"""Under strict, the loop commits a publish and the WAL's sync follows on its own thread.

The sync is SQLite's own after a FULL commit (``fdatasync`` of the WAL), run
off the write lock. These pin what that must keep: a publish returns only
after the real sync of the WAL file (and its directory, once); the loop and
the lock stay free meanwhile; commits made during a sync share the next one;
a failed sync fails its publishes as outcome-unknown, never as success; and
closing the broker waits for the sync in flight.

A ``Gate`` stands between the sync thread and the real ``fdatasync``: it can
hold a sync, to look at the world meanwhile, or fail one, as a disk would.
Every sync it lets through is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from wirework.brokers import Subscription, sqlite_wal_sync
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.envelope import WireMessage
from wirework.errors import PublishOutcomeUnknownError
from wirework.testing.conformance.support import wait_until

TOPIC = "orders"
DEADLINE = 5.0


class Gate:
    """Between the sync thread and ``fdatasync``: counts, holds, or fails the syncs."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self._real = real
        self._changed = threading.Condition()
        self._open = threading.Event()
        self._open.set()
        self.entered = 0
        self.synced: list[os.stat_result] = []
        """The files really synced, in order."""
        self.fail_next: Exception | None = None

    def __call__(self, fd: int) -> None:
        with self._changed:
            self.entered += 1
            self._changed.notify_all()
        assert self._open.wait(DEADLINE), "a test held the sync and never let it go"
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure
        self._real(fd)
        self.synced.append(os.fstat(fd))

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def wait_entered(self, count: int) -> None:
        """Until ``count`` syncs have begun, with a deadline."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: self.entered >= count, DEADLINE)

        assert await asyncio.to_thread(wait), f"{count} syncs never began"

    def syncs_of(self, path: Path) -> int:
        here = os.stat(path)
        return sum(os.path.samestat(done, here) for done in self.synced)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate(sqlite_wal_sync._datasync)
    monkeypatch.setattr(sqlite_wal_sync, "_datasync", gate)
    return gate


def message(n: int) -> WireMessage:
    return WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}")


@contextlib.asynccontextmanager
async def strict_broker(path: Path) -> AsyncIterator[SqliteBroker]:
    settings = SqliteSettings(durability="strict", busy_timeout=2.0)
    async with SqliteBroker(path, settings=settings) as broker:
        await broker.declare_group(Subscription(topic=TOPIC, group="g"))
        # Opened on the thread: from the next transaction the loop knows it is strict.
        await broker.publish(TOPIC, message(0))
        yield broker


async def test_a_publish_returns_only_after_the_wal_is_synced(tmp_path: Path, gate: Gate) -> None:
    path = tmp_path / "strict.db"
    wal = tmp_path / "strict.db-wal"
    async with strict_broker(path) as broker:
        writer = broker._started_writer()
        deliveries = broker.subscribe(Subscription(topic=TOPIC, group="g", start="earliest"))
        first = await asyncio.wait_for(anext(deliveries), DEADLINE)
        await first.ack()

        here, synced, entered = writer.commits_here, writer.synced, gate.entered
        gate.hold()
        publishing = asyncio.ensure_future(broker.publish(TOPIC, message(1)))
        await gate.wait_entered(entered + 1)
        assert writer.commits_here == here + 1  # committed by the loop, before the sync
        assert not publishing.done()
        # Meanwhile the loop and the write lock are free: the message is claimed and
        # acked (visible from its commit, as RabbitMQ delivers before its fsync).
        second = await asyncio.wait_for(anext(deliveries), DEADLINE)
        assert second.message.message_id == "m1"
        await second.ack()
        assert not publishing.done()
        gate.release()
        await asyncio.wait_for(publishing, DEADLINE)
        assert writer.synced == synced + 1
        await deliveries.aclose()
        # The file SQLite writes the commit's frames to (until the close deletes it),
        # and its directory once.
        assert gate.syncs_of(wal) >= 2
        assert gate.syncs_of(tmp_path) == 1


async def test_commits_made_during_a_sync_share_the_next(tmp_path: Path, gate: Gate) -> None:
    async with strict_broker(tmp_path / "strict.db") as broker:
        writer = broker._started_writer()
        here, synced, entered = writer.commits_here, writer.synced, gate.entered
        gate.hold()
        first = asyncio.ensure_future(broker.publish(TOPIC, message(1)))
        await gate.wait_entered(entered + 1)
        later = []
        for n in range(2, 6):
            later.append(asyncio.ensure_future(broker.publish(TOPIC, message(n))))
            await asyncio.sleep(0)  # its own loop iteration, so its own commit
            await asyncio.sleep(0)
        assert writer.commits_here == here + 5  # all committed, none waited for the lock
        assert not any(publish.done() for publish in [first, *later])
        gate.release()
        await asyncio.wait_for(asyncio.gather(first, *later), DEADLINE)
        assert writer.synced == synced + 2  # the first's sync, then one for the four


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), RuntimeError("a bug in the sync")],
    ids=["EIO", "a bug"],
)
async def test_a_failed_sync_fails_its_publish_as_outcome_unknown(
    tmp_path: Path, gate: Gate, failure: Exception
) -> None:
    async with strict_broker(tmp_path / "strict.db") as broker:
        gate.fail_next = failure
        with pytest.raises(
            PublishOutcomeUnknownError, match=rf"strict\.db-wal.*{re.escape(str(failure))}"
        ):
            await asyncio.wait_for(broker.publish(TOPIC, message(1)), DEADLINE)
        await asyncio.wait_for(broker.publish(TOPIC, message(2)), DEADLINE)
        # Committed, only not known to be on disk: the unknown one is delivered too.
        deliveries = broker.subscribe(Subscription(topic=TOPIC, group="g", start="earliest"))
        seen = []
        for _ in range(3):
            delivery = await asyncio.wait_for(anext(deliveries), DEADLINE)
            seen.append(str(delivery.message.message_id))
            await delivery.ack()
        await deliveries.aclose()
    assert sorted(seen) == ["m0", "m1", "m2"]


async def test_closing_waits_for_the_sync_in_flight(tmp_path: Path, gate: Gate) -> None:
    async with strict_broker(tmp_path / "strict.db") as broker:
        entered = gate.entered
        gate.hold()
        publishing = asyncio.ensure_future(broker.publish(TOPIC, message(1)))
        await gate.wait_entered(entered + 1)
        # Committed during that sync: it needs the next one, after the close began.
        waiting = asyncio.ensure_future(broker.publish(TOPIC, message(2)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        writer = broker._started_writer()
        closing = asyncio.ensure_future(broker.aclose())
        await wait_until(lambda: writer._stopped, DEADLINE, what="the writer's stop began")
        await asyncio.sleep(0)
        assert not closing.done()
        # The connection stays open: the last close would delete the WAL to be synced.
        assert writer._thread.is_alive()
        assert not publishing.done()
        assert not waiting.done()
        gate.release()
        await asyncio.wait_for(closing, DEADLINE)
        for publish in (publishing, waiting):
            assert publish.done()
            assert publish.exception() is None
        assert gate.entered == entered + 2
