"""The floor: the broker's own SQL for the same messages, with nothing around it.

One connection, one thread, no asyncio, no writer queue, no envelope decoding:
the statements are those of ``wirework.brokers.sqlite_ops``, called directly
(``publish``, ``claim``, ``ack``), so the floor can never fall out of step with
what the broker really runs. Per transaction, as in the broker's writer: all
publishes of a run in one ``publish`` call (multi-row INSERTs, the topic's
groups and listeners read once), one claim statement per claim (UPDATE ...
RETURNING), all acks of a run in one ``ack`` call (one DELETE per 64 handles,
one per 64 messages). The message records are built before the clock starts,
as the broker builds them on the event loop, not on its writer thread.

Same pragmas as the broker (WAL; ``synchronous`` FULL for strict, NORMAL for
fast, with the broker's checkpoint interval under fast). Since 2026-11-28 the
broker's event loop commits a strict publish without a sync and a thread of
its own then syncs the WAL, once for the commits made before it
(``sqlite_wal_sync``); such a commit is recorded as synced when it is the last
before a sync, and the floor commits it with FULL: the same fsyncs, made one
after another, as one thread must.

Two plans. ``replay`` runs the broker's own transactions of a run again
(``SqliteBroker.record_transactions``): the same calls, sizes and order, so
the same data too (a windowed producer runs thousands of messages ahead of the
consumer); the bench judges by it, workload 3 with the transactions of its
three processes in the order they committed, 6 on a copy of the broker's
backlog file. ``throughput`` spreads the work evenly, as the bench judged
until 2026-11-27 and still prints beside it: claims as large as the
broker's were on average, as many transactions as its writer committed, and
under strict as many of them synced as the broker synced
(``SqliteBroker.synced_commits``; its transactions of acks and claims alone
are not). Publishes run ahead of the consumer in a windowed run, so the
broker syncs few of its transactions there (200 of 2,500 in workload 1a): a
floor syncing every transaction that holds a publish paid ten times its fsyncs.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from bench.payload import GROUP, TOPIC
from wirework.brokers import sqlite_ops as ops
from wirework.brokers.sqlite import FAST_CHECKPOINT_PAGES, SqliteBroker
from wirework.brokers.sqlite_writer import Batch, Committed
from wirework.envelope import WireMessage

LEASE_SECONDS = 30.0

Kind = Literal["publish", "claim", "ack"]
#: One transaction: runs of one kind of operation, in order, with their sizes.
Transaction = list[tuple[Kind, int]]


@dataclass(frozen=True)
class Replayed:
    """One transaction of the broker's writer, to run again: ``SqliteBroker.operations_of``."""

    at: float
    """``time.monotonic()`` at its commit: the order of transactions of several processes."""
    synced: bool
    operations: list[tuple[str, int]]
    """("publish", messages), ("ack", handles), ("claim", limit), or another's name and 1."""


class FloorDb:
    """A broker-shaped SQLite file driven by hand, step by step."""

    def __init__(self, path: Path, *, durability: str, message: WireMessage) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.strict = durability == "strict"
        self.connection.execute(f"PRAGMA synchronous = {'FULL' if self.strict else 'NORMAL'}")
        if not self.strict:
            self.connection.execute(f"PRAGMA wal_autocheckpoint = {FAST_CHECKPOINT_PAGES}")
        self._synced = True
        self.synced = 0
        """Transactions begun at the file's own level (with an fsync at commit under strict)."""
        ops.migrate(self.connection, now=time.monotonic())
        self.connection.execute("BEGIN IMMEDIATE")
        ops.ensure_group(self.connection, Batch(), TOPIC, GROUP, "earliest", time.monotonic())
        self.connection.execute("COMMIT")
        self.headers = orjson.dumps(dict(message.headers))
        self.body = message.body
        self._claimed: deque[ops.Handle] = deque()

    def close(self) -> None:
        self.connection.close()

    def records(self, count: int) -> deque[ops.NewMessage]:
        """``count`` messages to publish, built as the broker's ``publish`` builds them."""
        now, wall = time.monotonic(), time.time()
        return deque(
            ops.NewMessage(TOPIC, None, self.headers, self.body, now, wall) for _ in range(count)
        )

    def begin(self, *, synced: bool = True) -> None:
        """Start a transaction; under strict, ``synced=False`` commits it without an fsync."""
        wanted = synced or not self.strict
        if wanted != self._synced:
            self.connection.execute(f"PRAGMA synchronous = {'FULL' if wanted else 'NORMAL'}")
            self._synced = wanted
        self.synced += wanted
        self.connection.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.connection.execute("COMMIT")

    def publish(self, records: list[ops.NewMessage]) -> None:
        ops.publish(self.connection, Batch(), records, None)

    def claim(self, limit: int) -> int:
        claimed, _ = ops.claim(
            self.connection, Batch(), TOPIC, GROUP, limit, time.monotonic(), LEASE_SECONDS
        )
        self._claimed.extend(row.handle for row in claimed)
        return len(claimed)

    def ack(self, count: int) -> None:
        handles = [self._claimed.popleft() for _ in range(min(count, len(self._claimed)))]
        ops.ack(self.connection, Batch(), handles)


def _operations(count: int, claim_size: int, publish: bool) -> Iterator[Kind]:
    """Per chunk of ``claim_size`` messages: publish each, claim them in one go, ack each."""
    remaining = count
    while remaining:
        chunk = min(claim_size, remaining)
        for _ in range(chunk if publish else 0):
            yield "publish"
        yield "claim"
        for _ in range(chunk):
            yield "ack"
        remaining -= chunk


def plan(count: int, *, claim_size: int, commits: int, publish: bool) -> list[Transaction]:
    """The operations cut into ``commits`` transactions of equal size, as runs of one kind."""
    claims = -(-count // claim_size)
    operations = count * (2 if publish else 1) + claims
    per_commit = operations / max(1, commits)
    transactions: list[Transaction] = [[]]
    next_commit = per_commit
    for done, kind in enumerate(_operations(count, claim_size, publish), start=1):
        runs = transactions[-1]
        if runs and runs[-1][0] == kind and kind != "claim":
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, claim_size if kind == "claim" else 1))
        if done >= next_commit:
            transactions.append([])
            next_commit += per_commit
    return [runs for runs in transactions if runs]


def throughput(
    db: FloorDb,
    *,
    count: int,
    claim_size: int,
    commits: int,
    publish: bool = True,
    synced: int | None = None,
) -> float:
    """Messages per second through publish (optional), claim and ack in ``commits`` transactions.

    ``synced``: how many of the broker's transactions were synced
    (``SqliteBroker.synced_commits``), to sync as many here, spread evenly;
    without it, the transactions holding a publish are (nearly all of them, as
    the operations are spread evenly, where the broker had some of acks and
    claims alone: a floor paying more fsyncs than the broker did).
    """
    transactions = plan(count, claim_size=claim_size, commits=commits, publish=publish)
    records = db.records(count if publish else 0)
    total = max(1, len(transactions))
    started = time.perf_counter()
    for number, runs in enumerate(transactions, start=1):
        if synced is None:
            sync = any(kind == "publish" for kind, _ in runs)
        else:
            # Integer steps, so exactly ``synced`` of them (a float credit can lose the last).
            sync = number * synced // total > (number - 1) * synced // total
        db.begin(synced=sync)
        for kind, size in runs:
            if kind == "publish":
                db.publish([records.popleft() for _ in range(size)])
            elif kind == "claim":
                if not db.claim(size):
                    raise RuntimeError("the floor found nothing to claim: its file is short")
            else:
                db.ack(size)
        db.commit()
    return count / (time.perf_counter() - started)


def replay(db: FloorDb, transactions: list[Replayed], *, messages: int) -> float:
    """Messages per second running the broker's own transactions again, one by one.

    The same calls of ``sqlite_ops`` with the same sizes, in the same
    transactions and order, synced where the broker's were: so the floor also
    works on the data the broker had, a backlog as deep as the one its producer
    ran up ahead of the consumer, which a plan spread evenly (``throughput``)
    keeps at a claim's worth of rows. Operations other than publish, claim and
    ack (housekeeping, such as forgetting a gone doorbell) are left out;
    ``others`` counts them, for the caller to say.
    """
    publishes = sum(
        size for done in transactions for kind, size in done.operations if kind == "publish"
    )
    records = db.records(publishes)
    claimed = acked = 0
    started = time.perf_counter()
    try:
        for done in transactions:
            db.begin(synced=done.synced)
            for kind, size in done.operations:
                if kind == "publish":
                    db.publish([records.popleft() for _ in range(size)])
                elif kind == "claim":
                    claimed += db.claim(size)
                elif kind == "ack":
                    acked += size
                    if acked > claimed:
                        raise RuntimeError("the replay acks rows it never claimed: not one run")
                    db.ack(size)
            db.commit()
    except BaseException:
        if db.connection.in_transaction:
            db.connection.execute("ROLLBACK")
        raise
    seconds = time.perf_counter() - started
    if acked != messages:
        raise RuntimeError(f"the replay acked {acked:,} messages of {messages:,}: not one run")
    return messages / seconds


def recorded(broker: SqliteBroker, committed: Sequence[Committed]) -> list[Replayed]:
    """What ``broker.record_transactions()`` recorded, as ``replay`` runs it."""
    return [Replayed(one.at, one.synced, broker.operations_of(one)) for one in committed]


def in_order(transactions: list[Replayed], between: tuple[float, float]) -> list[Replayed]:
    """Transactions committed within ``between``, by commit time: several processes' merged."""
    opens, closes = between
    kept = [one for one in transactions if opens <= one.at <= closes]
    return sorted(kept, key=lambda one: one.at)


def others(transactions: list[Replayed]) -> int:
    """Operations ``replay`` leaves out: neither publish, claim nor ack."""
    return sum(
        1
        for done in transactions
        for kind, _ in done.operations
        if kind not in ("publish", "claim", "ack")
    )


def latency(db: FloorDb, *, samples: int, gap: float, claim_size: int) -> list[float]:
    """Seconds from publishing one message to holding its claimed row, each after ``gap`` idle."""
    taken: list[float] = []
    for _ in range(samples):
        time.sleep(gap)
        records = list(db.records(1))
        started = time.perf_counter()
        db.begin()
        db.publish(records)
        db.commit()
        db.begin(synced=False)
        db.claim(claim_size)
        db.commit()
        taken.append(time.perf_counter() - started)
        db.begin(synced=False)
        db.ack(1)
        db.commit()
    return taken


def commit_seconds(path: Path, *, durability: str, commits: int = 200) -> float:
    """Median seconds of one transaction inserting one 1 KiB row: what the disk charges."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        sync = "FULL" if durability == "strict" else "NORMAL"
        connection.execute(f"PRAGMA synchronous = {sync}")
        connection.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, body BLOB)")
        taken = []
        for _ in range(commits):
            started = time.perf_counter()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO probe (body) VALUES (?)", (bytes(1024),))
            connection.execute("COMMIT")
            taken.append(time.perf_counter() - started)
    finally:
        connection.close()
    return sorted(taken)[len(taken) // 2]
