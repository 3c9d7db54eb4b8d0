"""The SQL of the SQLite broker: each function runs inside the writer's transaction.

``publish`` and ``ack`` are steps (``sqlite_writer.Step``): one call takes every
request of its kind in the transaction, since they are most of the traffic.
The others are one-off operations. Both check before they write, so a request
that fails with our error left nothing behind, and the others in the same
transaction still commit. All SQL is parameterised; table names are constants.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from wirework.brokers.base import DeadLetter, DeadLetterReason, Failure, GroupStats
from wirework.brokers.sqlite_schema import SCHEMA, SCHEMA_VERSION
from wirework.brokers.sqlite_writer import Batch
from wirework.envelope import WireMessage
from wirework.errors import ConfigurationError, DeadLetterNotFoundError, QueueFullError

T = TypeVar("T")

# The records below are not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, 0.6 us more per record, and there are three records per message.


@dataclass(slots=True)
class NewMessage:
    topic: str
    key: str | None
    headers: bytes
    body: bytes
    available_at: float
    published_at: float


@dataclass(slots=True)
class Handle:
    """Identifies one lease of one message in one group."""

    topic: str
    group: str
    seq: int
    token: int
    key: str | None


@dataclass(slots=True)
class Claimed:
    handle: Handle
    key: str | None
    attempts: int
    first_failure_at: float | None
    headers: bytes
    body: bytes


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def migrate(connection: sqlite3.Connection, *, now: float) -> None:
    """Create or upgrade the schema, and rebase monotonic times after a reboot.

    A file that is current (same schema, same boot) is only read, so opening
    it does not wait for another process's write lock.
    """
    if _is_current(connection):
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        row = connection.execute("SELECT value FROM ww_meta WHERE name = 'schema'").fetchone()
        if row is None:
            connection.execute(
                "INSERT INTO ww_meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the broker file has schema version {row[0]}, newer than this wirework "
                f"understands ({SCHEMA_VERSION}); upgrade wirework"
            )
        boot = _boot_id()
        stored = connection.execute("SELECT value FROM ww_meta WHERE name = 'boot'").fetchone()
        if stored is None or stored[0] != boot:
            # Monotonic times of another boot mean nothing now: free leases, end delays.
            connection.execute(
                "UPDATE ww_deliveries SET lease_until = NULL, available_at = ?", (now,)
            )
            connection.execute("DELETE FROM ww_listeners")
            connection.execute(
                "INSERT INTO ww_meta (name, value) VALUES ('boot', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (boot,),
            )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _is_current(connection: sqlite3.Connection) -> bool:
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ww_meta'"
    ).fetchone()
    if exists is None:
        return False
    values = dict(connection.execute("SELECT name, value FROM ww_meta").fetchall())
    return values.get("schema") == str(SCHEMA_VERSION) and values.get("boot") == _boot_id()


def _wake(connection: sqlite3.Connection, batch: Batch, topic: str) -> None:
    if topic in batch.listeners:
        return
    rows = connection.execute("SELECT address FROM ww_listeners WHERE topic = ?", (topic,))
    batch.listeners[topic] = [row[0] for row in rows]


def publish(
    connection: sqlite3.Connection,
    batch: Batch,
    messages: list[NewMessage],
    max_length: int | None,
) -> list[QueueFullError | None]:
    """Store each message with a delivery row per group; a full topic refuses the rest.

    The topic's groups are read once per call, not once per message: no other
    request runs inside this call, so they cannot change meanwhile.
    """
    groups_of: dict[str, list[str]] = {}
    lengths: dict[str, int] = {}
    outcomes: list[QueueFullError | None] = []
    accepted: list[tuple[NewMessage, list[str]]] = []
    for message in messages:
        topic = message.topic
        groups = groups_of.get(topic)
        if groups is None:
            groups = groups_of[topic] = _groups(connection, topic)
            if groups:
                _wake(connection, batch, topic)
        if max_length is not None:
            if topic not in lengths:
                lengths[topic] = _length(connection, topic)
            if lengths[topic] >= max_length:
                outcomes.append(_queue_full(topic, lengths[topic]))
                continue
            lengths[topic] += 1
        accepted.append((message, groups))
        outcomes.append(None)
    if accepted:
        _insert(connection, accepted)
        batch.published += len(accepted)
    return outcomes


def _groups(connection: sqlite3.Connection, topic: str) -> list[str]:
    rows = connection.execute("SELECT grp FROM ww_groups WHERE topic = ?", (topic,))
    return [row[0] for row in rows]


def _length(connection: sqlite3.Connection, topic: str) -> int:
    (length,) = connection.execute(
        "SELECT COUNT(*) FROM ww_messages WHERE topic = ?", (topic,)
    ).fetchone()
    return int(length)


def _queue_full(topic: str, length: int) -> QueueFullError:
    return QueueFullError(
        f"topic {topic!r} holds {length} messages, its max_queue_length; "
        f"nothing was stored: slow down, add consumers, or raise the limit"
    )


#: Rows one multi-row statement writes at most (7 values a row: far below SQLite's 999
#: parameters, the lowest limit any build has).
_CHUNK = 64


def _chunks(rows: list[T]) -> Iterator[list[T]]:
    """``rows`` in slices of powers of two up to ``_CHUNK``: few texts for the statement cache."""
    start, total = 0, len(rows)
    while start < total:
        size = min(_CHUNK, 1 << ((total - start).bit_length() - 1))
        yield rows[start : start + size]
        start += size


@functools.cache
def _values(statement: str, columns: int, rows: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return statement + " VALUES " + ", ".join([row] * rows)


def _insert_rows(
    connection: sqlite3.Connection, statement: str, rows: list[tuple[Any, ...]]
) -> None:
    """One ``INSERT`` per chunk of rows: one sqlite3_step for the chunk, not one a row."""
    for chunk in _chunks(rows):
        sql = _values(statement, len(chunk[0]), len(chunk))
        connection.execute(sql, list(itertools.chain.from_iterable(chunk)))


_MESSAGES_INSERT = "INSERT INTO ww_messages (seq, topic, key, headers, body, published_at, refs)"
_DELIVERIES_INSERT = "INSERT INTO ww_deliveries (topic, grp, seq, key, available_at)"


def _insert(connection: sqlite3.Connection, accepted: list[tuple[NewMessage, list[str]]]) -> None:
    """Write the messages and their delivery rows, a few multi-row statements in all.

    Sequence numbers are given here, after the highest ever handed out
    (``sqlite_sequence``, which AUTOINCREMENT keeps and raises past any given
    one): this transaction holds the write lock, so nobody takes them meanwhile.
    One statement per 64 rows instead of two a message (with ``ack`` below: the
    SQL of a message published, claimed and acked, 64 a transaction, went from
    146k to 127k instructions, callgrind). Where the writer's thread runs the
    transaction, each statement is also a GIL hand-over (the GIL is let go around
    ``sqlite3_step``), and while the event loop is busy, getting it back can take
    a whole loop iteration.
    """
    row = connection.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'ww_messages'"
    ).fetchone()
    seq = row[0] if row is not None else 0
    messages: list[tuple[Any, ...]] = []
    deliveries: list[tuple[Any, ...]] = []
    for message, groups in accepted:
        seq += 1
        topic, key, available_at = message.topic, message.key, message.available_at
        messages.append(
            (seq, topic, key, message.headers, message.body, message.published_at, len(groups))
        )
        for group in groups:
            deliveries.append((topic, group, seq, key, available_at))
    _insert_rows(connection, _MESSAGES_INSERT, messages)
    if deliveries:
        _insert_rows(connection, _DELIVERIES_INSERT, deliveries)


def ensure_group(
    connection: sqlite3.Connection, batch: Batch, topic: str, group: str, start: str, now: float
) -> None:
    created = connection.execute(
        "INSERT OR IGNORE INTO ww_groups (topic, grp) VALUES (?, ?)", (topic, group)
    ).rowcount
    if not created:
        return
    if start == "earliest":
        connection.execute(
            "INSERT INTO ww_deliveries (topic, grp, seq, key, available_at) "
            "SELECT topic, ?, seq, key, ? FROM ww_messages WHERE topic = ?",
            (group, now, topic),
        )
        connection.execute("UPDATE ww_messages SET refs = refs + 1 WHERE topic = ?", (topic,))
    else:
        # Messages kept only because no group existed yet are not this group's to read.
        connection.execute("DELETE FROM ww_messages WHERE topic = ? AND refs = 0", (topic,))


def delete_group(connection: sqlite3.Connection, batch: Batch, topic: str, group: str) -> None:
    """Forget a group and its undelivered rows; its dead letters stay for inspection."""
    seqs = [
        (row[0],)
        for row in connection.execute(
            "SELECT seq FROM ww_deliveries WHERE topic = ? AND grp = ?", (topic, group)
        )
    ]
    connection.execute("DELETE FROM ww_deliveries WHERE topic = ? AND grp = ?", (topic, group))
    connection.executemany("UPDATE ww_messages SET refs = refs - 1 WHERE seq = ?", seqs)
    connection.execute("DELETE FROM ww_groups WHERE topic = ? AND grp = ?", (topic, group))
    remaining = connection.execute("SELECT 1 FROM ww_groups WHERE topic = ?", (topic,)).fetchone()
    if remaining is None:
        connection.execute("DELETE FROM ww_messages WHERE topic = ?", (topic,))
        connection.execute("DELETE FROM ww_listeners WHERE topic = ?", (topic,))
    else:
        connection.execute("DELETE FROM ww_messages WHERE topic = ? AND refs <= 0", (topic,))


def listen(connection: sqlite3.Connection, batch: Batch, address: str, topic: str) -> None:
    connection.execute(
        "INSERT OR IGNORE INTO ww_listeners (address, topic) VALUES (?, ?)", (address, topic)
    )


def forget_listeners(connection: sqlite3.Connection, batch: Batch, addresses: list[str]) -> None:
    connection.executemany(
        "DELETE FROM ww_listeners WHERE address = ?", [(address,) for address in addresses]
    )


# One statement leases the rows and returns them with their message (SQLite >= 3.35
# has RETURNING): 1 statement a claim instead of 1 + 2 a row, a third of the writer's
# statements with claims of 32. RETURNING gives rows in no set order; claim sorts them.
_CLAIM = """
UPDATE ww_deliveries
SET lease_until = :until, attempts = attempts + 1, token = token + 1
WHERE topic = :topic AND grp = :grp AND seq IN (
    SELECT d.seq
    FROM ww_deliveries AS d
    WHERE d.topic = :topic AND d.grp = :grp
      AND d.available_at <= :now
      AND (d.lease_until IS NULL OR d.lease_until <= :now)
      AND (d.key IS NULL OR NOT EXISTS (
            SELECT 1 FROM ww_deliveries AS e
            WHERE e.topic = d.topic AND e.grp = d.grp AND e.key = d.key AND e.seq < d.seq))
    ORDER BY d.seq
    LIMIT :limit)
RETURNING seq, key, attempts, first_failure_at, token,
    (SELECT headers FROM ww_messages AS m WHERE m.seq = ww_deliveries.seq),
    (SELECT body FROM ww_messages AS m WHERE m.seq = ww_deliveries.seq)
"""

_NEXT_DUE = """
SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > :now
                THEN MAX(lease_until, available_at) ELSE available_at END)
FROM ww_deliveries
WHERE topic = :topic AND grp = :grp
  AND (available_at > :now OR (lease_until IS NOT NULL AND lease_until > :now))
"""


def claim(
    connection: sqlite3.Connection,
    batch: Batch,
    topic: str,
    group: str,
    limit: int,
    now: float,
    lease: float,
) -> tuple[list[Claimed], float | None]:
    """Lease up to ``limit`` available messages; else say when the next one is due."""
    params = {"topic": topic, "grp": group, "now": now, "limit": limit, "until": now + lease}
    rows = connection.execute(_CLAIM, params).fetchall()
    if not rows:
        (due,) = connection.execute(_NEXT_DUE, params).fetchone()
        return [], due
    rows.sort()
    claimed = [
        Claimed(Handle(topic, group, seq, token, key), key, attempts, first_failure, headers, body)
        for seq, key, attempts, first_failure, token, headers, body in rows
    ]
    return claimed, None


def _remove(connection: sqlite3.Connection, handle: Handle) -> bool:
    deleted = connection.execute(
        "DELETE FROM ww_deliveries WHERE topic = ? AND grp = ? AND seq = ? AND token = ?",
        (handle.topic, handle.group, handle.seq, handle.token),
    ).rowcount
    if not deleted:
        return False
    _release_messages(connection, [handle.seq])
    return True


def _release_messages(connection: sqlite3.Connection, seqs: list[int]) -> None:
    """One delivery row of each message in ``seqs`` (distinct) is gone: lower its refs.

    The last group to let go deletes the message (refs counts the delivery rows,
    so it is >= 1 here); only a message other groups still hold is updated.
    """
    for chunk in _chunks(seqs):
        marks = ", ".join("?" * len(chunk))
        deleted = connection.execute(
            f"DELETE FROM ww_messages WHERE seq IN ({marks}) AND refs <= 1", chunk
        ).rowcount
        if deleted < len(chunk):
            connection.execute(
                f"UPDATE ww_messages SET refs = refs - 1 WHERE seq IN ({marks})", chunk
            )


@functools.cache
def _ack_sql(rows: int) -> str:
    marks = ", ".join("?" * rows)
    tokens = " ".join(["WHEN ? THEN ?"] * rows)
    return (
        f"DELETE FROM ww_deliveries WHERE topic = ? AND grp = ? AND seq IN ({marks}) "
        f"AND token = CASE seq {tokens} END RETURNING seq, token"
    )


def ack(connection: sqlite3.Connection, batch: Batch, handles: list[Handle]) -> list[bool]:
    """Per handle, True if its lease was current; a stale ack (lease ran out) changes nothing.

    A statement per group and 64 handles, then one per 64 messages, instead of
    two per handle (see ``_insert`` for why fewer statements pay).
    """
    removed: set[tuple[str, str, int, int]] = set()
    by_group: dict[tuple[str, str], list[Handle]] = {}
    for handle in handles:
        by_group.setdefault((handle.topic, handle.group), []).append(handle)
    for (topic, group), mine in by_group.items():
        if len({handle.seq for handle in mine}) < len(mine):
            # A stale and a current handle of one message: the CASE would see only one.
            removed.update(
                (topic, group, handle.seq, handle.token)
                for handle in mine
                if _delete_delivery(connection, handle)
            )
            continue
        for chunk in _chunks(mine):
            params: list[Any] = [topic, group, *(handle.seq for handle in chunk)]
            for handle in chunk:
                params += (handle.seq, handle.token)
            rows = connection.execute(_ack_sql(len(chunk)), params).fetchall()
            removed.update((topic, group, seq, token) for seq, token in rows)
    seqs = [seq for _topic, _group, seq, _token in removed]
    if len(set(seqs)) == len(seqs):
        _release_messages(connection, seqs)
    else:  # groups letting go of one message in one call: once each, in turn
        for seq in seqs:
            _release_messages(connection, [seq])
    outcomes = []
    for handle in handles:
        current = (handle.topic, handle.group, handle.seq, handle.token) in removed
        if current and handle.key is not None:
            _wake_successor(connection, batch, handle)
        outcomes.append(current)
    return outcomes


def _delete_delivery(connection: sqlite3.Connection, handle: Handle) -> bool:
    return bool(
        connection.execute(
            "DELETE FROM ww_deliveries WHERE topic = ? AND grp = ? AND seq = ? AND token = ?",
            (handle.topic, handle.group, handle.seq, handle.token),
        ).rowcount
    )


def _wake_successor(connection: sqlite3.Connection, batch: Batch, handle: Handle) -> None:
    """The next message of the same key was waiting for this one."""
    successor = connection.execute(
        "SELECT 1 FROM ww_deliveries WHERE topic = ? AND grp = ? AND key = ? LIMIT 1",
        (handle.topic, handle.group, handle.key),
    ).fetchone()
    if successor is not None:
        _wake(connection, batch, handle.topic)


def nack(
    connection: sqlite3.Connection,
    batch: Batch,
    handle: Handle,
    available_at: float,
    error: Failure | None,
    wall: float,
) -> bool:
    changed = connection.execute(
        "UPDATE ww_deliveries SET lease_until = NULL, available_at = ?, "
        "first_failure_at = CASE WHEN ? THEN COALESCE(first_failure_at, ?) "
        "ELSE first_failure_at END, "
        "last_error = COALESCE(?, last_error) "
        "WHERE topic = ? AND grp = ? AND seq = ? AND token = ?",
        (
            available_at,
            error is not None,
            wall,
            error.model_dump_json() if error else None,
            handle.topic,
            handle.group,
            handle.seq,
            handle.token,
        ),
    ).rowcount
    if changed:
        _wake(connection, batch, handle.topic)
    return bool(changed)


def release(
    connection: sqlite3.Connection, batch: Batch, handles: list[Handle], now: float
) -> None:
    """Hand leases back at once (a consumer left); the attempt already counted stays counted.

    The token moves on, so a late settle of a handed-back delivery has no effect.
    """
    connection.executemany(
        "UPDATE ww_deliveries SET lease_until = NULL, available_at = MIN(available_at, ?), "
        "token = token + 1 WHERE topic = ? AND grp = ? AND seq = ? AND token = ?",
        [(now, h.topic, h.group, h.seq, h.token) for h in handles],
    )
    for topic in {h.topic for h in handles}:
        _wake(connection, batch, topic)


def dead_letter(
    connection: sqlite3.Connection,
    batch: Batch,
    handle: Handle,
    reason: str,
    error: Failure | None,
    wall: float,
) -> bool:
    row = connection.execute(
        "SELECT d.key, d.attempts, d.first_failure_at, d.last_error, m.headers, m.body "
        "FROM ww_deliveries AS d JOIN ww_messages AS m ON m.seq = d.seq "
        "WHERE d.topic = ? AND d.grp = ? AND d.seq = ? AND d.token = ?",
        (handle.topic, handle.group, handle.seq, handle.token),
    ).fetchone()
    if row is None:
        return False
    key, attempts, first_failure_at, last_error, headers, body = row
    message_id = WireMessage(headers=orjson.loads(headers), body=body).message_id
    error_json = error.model_dump_json() if error else last_error
    connection.execute(
        "INSERT INTO ww_dead_letters (topic, grp, key, message_id, reason, attempts, "
        "first_failure_at, last_failure_at, dead_lettered_at, error, headers, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            handle.topic,
            handle.group,
            key,
            message_id,
            reason,
            attempts,
            first_failure_at or wall,
            wall,
            wall,
            error_json,
            headers,
            body,
        ),
    )
    _remove(connection, handle)
    _wake(connection, batch, handle.topic)
    return True


_DEAD_LETTER_COLUMNS = (
    "id, topic, grp, key, message_id, reason, attempts, first_failure_at, last_failure_at, "
    "dead_lettered_at, error, headers, body"
)


def list_dead_letters(
    connection: sqlite3.Connection,
    batch: Batch,
    topic: str | None,
    group: str | None,
    reason: str | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    return connection.execute(
        f"SELECT {_DEAD_LETTER_COLUMNS} FROM ww_dead_letters "
        "WHERE (:topic IS NULL OR topic = :topic) AND (:grp IS NULL OR grp = :grp) "
        "AND (:reason IS NULL OR reason = :reason) ORDER BY id LIMIT :limit",
        {"topic": topic, "grp": group, "reason": reason, "limit": limit},
    ).fetchall()


def _dead_letter_row(connection: sqlite3.Connection, dead_letter_id: str) -> tuple[Any, ...]:
    try:
        number = int(dead_letter_id)
    except ValueError:
        number = -1
    row = connection.execute(
        f"SELECT {_DEAD_LETTER_COLUMNS} FROM ww_dead_letters WHERE id = ?", (number,)
    ).fetchone()
    if row is None:
        raise DeadLetterNotFoundError(
            f"no dead letter with id {dead_letter_id!r}; `wirework dlq list` shows the ids"
        )
    return tuple(row)


def get_dead_letter(
    connection: sqlite3.Connection, batch: Batch, dead_letter_id: str
) -> tuple[Any, ...]:
    return _dead_letter_row(connection, dead_letter_id)


def replay(
    connection: sqlite3.Connection, batch: Batch, ids: list[str], now: float, wall: float
) -> int:
    rows = [_dead_letter_row(connection, one) for one in dict.fromkeys(ids)]
    for row in rows:
        number, topic, group, key, *_rest, headers, body = row
        connection.execute(
            "INSERT OR IGNORE INTO ww_groups (topic, grp) VALUES (?, ?)", (topic, group)
        )
        cursor = connection.execute(
            "INSERT INTO ww_messages (topic, key, headers, body, published_at, refs) "
            "VALUES (?, ?, ?, ?, ?, 1)",
            (topic, key, headers, body, wall),
        )
        connection.execute(
            "INSERT INTO ww_deliveries (topic, grp, seq, key, available_at) VALUES (?, ?, ?, ?, ?)",
            (topic, group, cursor.lastrowid, key, now),
        )
        connection.execute("DELETE FROM ww_dead_letters WHERE id = ?", (number,))
        _wake(connection, batch, topic)
    return len(rows)


def to_dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    (number, topic, group, key, message_id, reason, attempts, first, last, dead, error) = row[:11]
    headers, body = row[11], row[12]
    return DeadLetter(
        id=str(number),
        topic=topic,
        group=group,
        key=key,
        message_id=message_id,
        reason=DeadLetterReason(reason),
        attempts=attempts,
        first_failure_at=datetime.fromtimestamp(first, UTC),
        last_failure_at=datetime.fromtimestamp(last, UTC),
        dead_lettered_at=datetime.fromtimestamp(dead, UTC),
        error=Failure.model_validate_json(error) if error else None,
        message=WireMessage(headers=orjson.loads(headers), body=bytes(body)),
    )


_STATS = """
SELECT g.topic, g.grp,
  COALESCE(SUM(d.seq IS NOT NULL AND (d.lease_until IS NULL OR d.lease_until <= :now)
               AND d.available_at <= :now), 0),
  COALESCE(SUM(d.seq IS NOT NULL AND (d.lease_until IS NULL OR d.lease_until <= :now)
               AND d.available_at > :now), 0),
  COALESCE(SUM(d.lease_until > :now), 0)
FROM ww_groups AS g LEFT JOIN ww_deliveries AS d ON d.topic = g.topic AND d.grp = g.grp
GROUP BY g.topic, g.grp
ORDER BY g.topic, g.grp
"""


def stats(connection: sqlite3.Connection, batch: Batch, now: float) -> list[GroupStats]:
    dead = {
        (topic, group): count
        for topic, group, count in connection.execute(
            "SELECT topic, grp, COUNT(*) FROM ww_dead_letters GROUP BY topic, grp"
        )
    }
    result = [
        GroupStats(
            topic=topic,
            group=group,
            ready=ready,
            delayed=delayed,
            in_flight=in_flight,
            dead_lettered=dead.get((topic, group), 0),
        )
        for topic, group, ready, delayed, in_flight in connection.execute(_STATS, {"now": now})
    ]
    for topic, count in connection.execute(
        "SELECT topic, COUNT(*) FROM ww_messages WHERE refs = 0 GROUP BY topic ORDER BY topic"
    ):
        result.append(
            GroupStats(
                topic=topic, group=None, ready=count, delayed=0, in_flight=0, dead_lettered=0
            )
        )
    return result
