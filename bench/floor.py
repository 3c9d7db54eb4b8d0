"""The floor: the broker's SQL for the same messages, run with plain ``sqlite3``.

One connection, one thread, no asyncio, no envelope decoding: per message the
statements ``wirework.brokers.sqlite_ops`` runs (kept in step by hand):

* publish: the group lookup, the message INSERT, one delivery INSERT per group
  (and once per transaction the doorbell's listener lookup);
* claim: the claim SELECT for up to ``claim_size`` rows, then per row the
  lease UPDATE and the headers/body SELECT;
* ack: the delivery DELETE, the refs UPDATE, the message DELETE.

Same pragmas (WAL; ``synchronous`` FULL for strict, NORMAL for fast); claims
as large as the broker's were on average and as many transactions as its
writer committed in the same workload, spread evenly, so both sides pay for
the same fsyncs.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import orjson

from bench.payload import GROUP, TOPIC
from wirework.brokers.sqlite_schema import SCHEMA
from wirework.envelope import WireMessage

LEASE_SECONDS = 30.0

_CLAIM = """
SELECT d.seq, d.key, d.attempts, d.first_failure_at, d.token
FROM ww_deliveries AS d
WHERE d.topic = :topic AND d.grp = :grp
  AND d.available_at <= :now
  AND (d.lease_until IS NULL OR d.lease_until <= :now)
  AND (d.key IS NULL OR NOT EXISTS (
        SELECT 1 FROM ww_deliveries AS e
        WHERE e.topic = d.topic AND e.grp = d.grp AND e.key = d.key AND e.seq < d.seq))
ORDER BY d.seq
LIMIT :limit
"""


class FloorDb:
    """A broker-shaped SQLite file driven by hand, statement by statement."""

    def __init__(self, path: Path, *, durability: str, message: WireMessage) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode = WAL")
        sync = "FULL" if durability == "strict" else "NORMAL"
        self.connection.execute(f"PRAGMA synchronous = {sync}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.connection.execute(statement)
        self.connection.execute("INSERT OR IGNORE INTO ww_groups VALUES (?, ?)", (TOPIC, GROUP))
        self.headers = orjson.dumps(dict(message.headers))
        self.body = message.body
        self._claimed: deque[tuple[int, int]] = deque()
        self._woken = False

    def close(self) -> None:
        self.connection.close()

    def begin(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")
        self._woken = False

    def commit(self) -> None:
        self.connection.execute("COMMIT")

    def publish(self) -> None:
        execute = self.connection.execute
        groups = [row[0] for row in execute("SELECT grp FROM ww_groups WHERE topic = ?", (TOPIC,))]
        seq = execute(
            "INSERT INTO ww_messages (topic, key, headers, body, published_at, refs) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (TOPIC, None, self.headers, self.body, time.time(), len(groups)),
        ).lastrowid
        now = time.monotonic()
        self.connection.executemany(
            "INSERT INTO ww_deliveries (topic, grp, seq, key, available_at) VALUES (?, ?, ?, ?, ?)",
            [(TOPIC, group, seq, None, now) for group in groups],
        )
        if not self._woken:
            self._woken = True
            execute("SELECT address FROM ww_listeners WHERE topic = ?", (TOPIC,)).fetchall()

    def claim(self, limit: int) -> int:
        execute = self.connection.execute
        now = time.monotonic()
        params = {"topic": TOPIC, "grp": GROUP, "now": now, "limit": limit}
        rows = execute(_CLAIM, params).fetchall()
        for seq, _key, _attempts, _first_failure_at, token in rows:
            execute(
                "UPDATE ww_deliveries SET lease_until = ?, attempts = attempts + 1, "
                "token = token + 1 WHERE topic = ? AND grp = ? AND seq = ?",
                (now + LEASE_SECONDS, TOPIC, GROUP, seq),
            )
            execute("SELECT headers, body FROM ww_messages WHERE seq = ?", (seq,)).fetchone()
            self._claimed.append((seq, token + 1))
        return len(rows)

    def ack(self) -> None:
        execute = self.connection.execute
        seq, token = self._claimed.popleft()
        execute(
            "DELETE FROM ww_deliveries WHERE topic = ? AND grp = ? AND seq = ? AND token = ?",
            (TOPIC, GROUP, seq, token),
        )
        execute("UPDATE ww_messages SET refs = refs - 1 WHERE seq = ?", (seq,))
        execute("DELETE FROM ww_messages WHERE seq = ? AND refs <= 0", (seq,))


def _operations(db: FloorDb, count: int, claim_size: int, publish: bool) -> Iterator[None]:
    """Per chunk of ``claim_size`` messages: publish each, claim them in one go, ack each."""
    remaining = count
    while remaining:
        chunk = min(claim_size, remaining)
        for _ in range(chunk if publish else 0):
            db.publish()
            yield
        got = db.claim(chunk)
        yield
        for _ in range(got):
            db.ack()
            yield
        remaining -= got
        if not got:
            raise RuntimeError("the floor found nothing to claim: its file has too few messages")


def throughput(
    db: FloorDb, *, count: int, claim_size: int, commits: int, publish: bool = True
) -> float:
    """Messages per second through publish (optional), claim and ack in ``commits`` transactions."""
    claims = -(-count // claim_size)
    operations = count * (2 if publish else 1) + claims
    per_commit = operations / max(1, commits)
    started = time.perf_counter()
    db.begin()
    next_commit = per_commit
    for done, _ in enumerate(_operations(db, count, claim_size, publish), start=1):
        if done >= next_commit:
            db.commit()
            db.begin()
            next_commit += per_commit
    db.commit()
    return count / (time.perf_counter() - started)


def latency(db: FloorDb, *, samples: int, gap: float, claim_size: int) -> list[float]:
    """Seconds from publishing one message to holding its claimed row, each after ``gap`` idle."""
    taken: list[float] = []
    for _ in range(samples):
        time.sleep(gap)
        started = time.perf_counter()
        db.begin()
        db.publish()
        db.commit()
        db.begin()
        db.claim(claim_size)
        db.commit()
        taken.append(time.perf_counter() - started)
        db.begin()
        db.ack()
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
