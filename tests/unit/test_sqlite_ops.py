"""The SQLite broker's set-based SQL on a real file: multi-row publish, batched ack.

``sqlite_ops.publish`` writes a call's messages in a few multi-row INSERTs with
sequence numbers it assigns itself, and ``ack`` deletes a call's handles with a
statement per group and 64 handles; these check the cases a set-based
statement could get wrong.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wirework.brokers import sqlite_ops as ops
from wirework.brokers.sqlite_writer import Batch

TOPIC = "ops.topic"


@pytest.fixture
def connection(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    ops.migrate(connection, now=time.monotonic())
    try:
        yield connection
    finally:
        connection.close()


def run(connection: sqlite3.Connection, step: Any, *args: object) -> Any:
    """One transaction around one call, as the writer runs it."""
    connection.execute("BEGIN IMMEDIATE")
    result = step(connection, Batch(), *args)
    connection.execute("COMMIT")
    return result


def records(count: int, *, start: int = 0, key: str | None = None) -> list[ops.NewMessage]:
    now, wall = time.monotonic(), time.time()
    return [
        ops.NewMessage(TOPIC, key, b"{}", f"body {n}".encode(), now, wall)
        for n in range(start, start + count)
    ]


def claim(connection: sqlite3.Connection, group: str, limit: int) -> list[ops.Claimed]:
    claimed, _ = run(connection, ops.claim, TOPIC, group, limit, time.monotonic(), 30.0)
    return list(claimed)


def rows(connection: sqlite3.Connection, table: str) -> int:
    return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_a_large_publish_keeps_order_and_never_reuses_a_sequence_number(
    connection: sqlite3.Connection,
) -> None:
    """100 messages in one call (chunks of 64, 32, 4) arrive in order; after they are all
    acked and deleted, new messages still get higher numbers (AUTOINCREMENT's promise)."""
    run(connection, ops.ensure_group, TOPIC, "g", "earliest", time.monotonic())
    assert run(connection, ops.publish, records(100), None) == [None] * 100
    claimed = claim(connection, "g", 200)
    assert [row.body for row in claimed] == [f"body {n}".encode() for n in range(100)]
    seqs = [row.handle.seq for row in claimed]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 100
    assert run(connection, ops.ack, [row.handle for row in claimed]) == [True] * 100
    assert rows(connection, "ww_messages") == rows(connection, "ww_deliveries") == 0
    run(connection, ops.publish, records(3, start=100), None)
    later = claim(connection, "g", 10)
    assert [row.body for row in later] == [f"body {n}".encode() for n in range(100, 103)]
    assert min(row.handle.seq for row in later) > max(seqs)


def test_a_message_goes_only_when_every_group_acked_it_even_in_one_call(
    connection: sqlite3.Connection,
) -> None:
    """Two groups acking the same messages in one call: both rows go, and so does the message."""
    for group in ("a", "b"):
        run(connection, ops.ensure_group, TOPIC, group, "earliest", time.monotonic())
    run(connection, ops.publish, records(3), None)
    from_a, from_b = claim(connection, "a", 3), claim(connection, "b", 3)
    assert run(connection, ops.ack, [from_a[0].handle]) == [True]
    assert rows(connection, "ww_messages") == 3  # group b still holds it
    handles = [row.handle for row in from_a[1:] + from_b]
    assert run(connection, ops.ack, handles) == [True] * 5
    assert rows(connection, "ww_messages") == rows(connection, "ww_deliveries") == 0


def test_a_stale_and_a_current_handle_of_one_message_in_one_call(
    connection: sqlite3.Connection,
) -> None:
    """A lease that ran out and the new lease of the same message, acked together: only the
    current one counts, and the message is deleted once."""
    run(connection, ops.ensure_group, TOPIC, "g", "earliest", time.monotonic())
    run(connection, ops.publish, records(2), None)
    (old, other) = claim(connection, "g", 2)
    run(connection, ops.release, [old.handle], time.monotonic())
    (new,) = claim(connection, "g", 1)
    assert new.handle.seq == old.handle.seq
    assert new.handle.token != old.handle.token
    outcomes = run(connection, ops.ack, [old.handle, new.handle, other.handle])
    assert outcomes == [False, True, True]
    assert rows(connection, "ww_messages") == rows(connection, "ww_deliveries") == 0


def test_an_ack_of_a_keyed_message_frees_the_next_of_its_key(
    connection: sqlite3.Connection,
) -> None:
    """Acked in a batch with others, a keyed message still lets its successor be claimed."""
    run(connection, ops.ensure_group, TOPIC, "g", "earliest", time.monotonic())
    run(connection, ops.publish, records(2, key="k") + records(1, start=2), None)
    first, unkeyed = claim(connection, "g", 10)
    assert [first.body, unkeyed.body] == [b"body 0", b"body 2"]  # body 1 waits for body 0
    connection.execute("BEGIN IMMEDIATE")
    batch = Batch()
    assert ops.ack(connection, batch, [first.handle, unkeyed.handle]) == [True, True]
    connection.execute("COMMIT")
    assert TOPIC in batch.listeners  # idle subscribers are woken for the successor
    assert [row.body for row in claim(connection, "g", 10)] == [b"body 1"]
