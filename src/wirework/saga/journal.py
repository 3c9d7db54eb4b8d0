"""Saga instances and their history in the store: every read and write the saga makes.

Two tables (schema version 2): ``wirework_saga``, one row per instance with
its status, input, last error and lease; ``wirework_saga_event``, its history,
one row per transition in commit order. A transition is one transaction:

1. ``UPDATE wirework_saga ... WHERE saga_id = $id AND owner = $me`` sets the
   new status and renews the lease; no row changed means another orchestrator
   took the saga over, and the transaction is rolled back
   (``SagaLeaseLostError``): a driver that lost its lease can record nothing.
2. ``INSERT`` the history event.
3. With events on, ``tx.publish`` the state change to ``wirework.sagas``
   through the outbox, so it is published if and only if it was recorded.

The lease is taken with one conditional ``UPDATE`` (free, run out, or written
by a clock that has since gone back), so two orchestrators racing for one
saga cannot both win; times are the store's clock, as for the outbox relay.

These functions need no saga definitions, so the CLI reads and retries
sagas with them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel

from wirework.envelope import SAGA_EXTENSION, Envelope
from wirework.errors import ConfigurationError
from wirework.saga.errors import SagaLeaseLostError, SagaNotFoundError, SagaStateError
from wirework.saga.state import ACTIVE, Event, Kind, SagaStatus
from wirework.store.base import Row, Store, Transaction

#: The store's clock (epoch seconds) read in SQL when a statement checks a row, which on
#: PostgreSQL may be after waiting for another transaction's row lock.
_CLOCK = {
    "postgresql": "extract(epoch FROM clock_timestamp())::float8",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}

#: Seconds a lease may end beyond its length from the clock read as its row is checked
#: before it counts as from a clock gone back. SQLite's SQL clock has millisecond steps,
#: the writer's (``time.time``) microseconds: a lease written in the same millisecond
#: looked "far ahead" to the next claim, and was taken.
_CLOCK_SLACK = 1.0

#: Where saga state changes are published.
TOPIC = "wirework.sagas"
#: The ``source`` of those events.
SOURCE = "/wirework/saga"

_ACTIVE = tuple(status.value for status in ACTIVE)
_COLUMNS = (
    "saga_id, name, status, input, error, owner, lease_until, created_at, updated_at, ended_at"
)


class SagaRecord(BaseModel):
    """One saga instance as stored."""

    saga_id: str
    name: str
    status: SagaStatus
    input: dict[str, Any]
    error: str | None
    """The failure that made it compensate, or the compensation failure that ended it."""
    owner: str | None
    """The orchestrator driving it now (None when none is)."""
    lease_until: float
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None


class SagaEvent(BaseModel):
    """One history event: a transition, recorded before it was acted on."""

    seq: int
    saga_id: str
    at: datetime
    kind: Kind
    step: str | None
    attempt: int | None
    status: SagaStatus
    """The saga's status once this event was recorded."""
    data: dict[str, Any]
    """``output`` (step_completed), ``error``, ``error_type``, ``unknown``, ``final``
    (failures); ``input`` and the lineage, ``correlation_id``, ``causation_id``,
    ``traceparent``, ``tracestate``, when known (saga_started)."""

    def state_event(self) -> Event:
        return Event(kind=self.kind, step=self.step, attempt=self.attempt, data=self.data)


class SagaHistory(BaseModel):
    """A saga instance and every event of it, oldest first."""

    saga: SagaRecord
    events: list[SagaEvent]

    @property
    def started(self) -> dict[str, Any]:
        """The data of the ``saga_started`` event: the input and the lineage (empty: none)."""
        for event in self.events:
            if event.kind is Kind.SAGA_STARTED:
                return event.data
        return {}


class SagaChanged(BaseModel):
    """The body of the events published on ``wirework.sagas`` (type ``saga.<status>``)."""

    __event_type__: ClassVar[str] = "saga.changed"

    saga_id: str
    saga: str
    status: SagaStatus
    step: str | None = None
    error: str | None = None


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _record(row: Row) -> SagaRecord:
    return SagaRecord(
        saga_id=row["saga_id"],
        name=row["name"],
        status=SagaStatus(row["status"]),
        input=orjson.loads(row["input"]),
        error=row["error"],
        owner=row["owner"],
        lease_until=float(row["lease_until"]),
        created_at=_when(float(row["created_at"])),
        updated_at=_when(float(row["updated_at"])),
        ended_at=None if row["ended_at"] is None else _when(float(row["ended_at"])),
    )


def _event(row: Row) -> SagaEvent:
    return SagaEvent(
        seq=int(row["seq"]),
        saga_id=row["saga_id"],
        at=_when(float(row["at"])),
        kind=Kind(row["kind"]),
        step=row["step"],
        attempt=None if row["attempt"] is None else int(row["attempt"]),
        status=SagaStatus(row["status"]),
        data=orjson.loads(row["data"]),
    )


async def _publish(
    tx: Transaction, saga_id: str, name: str, status: SagaStatus, event_type: str, **extra: Any
) -> None:
    body = SagaChanged(saga_id=saga_id, saga=name, status=status, **extra)
    envelope = Envelope.new(
        event_type,
        body,
        source=SOURCE,
        key=saga_id,
        subject=saga_id,
        extensions={SAGA_EXTENSION: saga_id},
    )
    await tx.publish(TOPIC, envelope)


async def _insert_event(
    tx: Transaction,
    saga_id: str,
    at: float,
    kind: Kind,
    status: SagaStatus,
    *,
    step: str | None = None,
    attempt: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> None:
    await tx.execute(
        "INSERT INTO wirework_saga_event (saga_id, at, kind, step, attempt, status, data)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        saga_id,
        at,
        kind.value,
        step,
        attempt,
        status.value,
        orjson.dumps(dict(data or {})).decode(),
    )


async def create(
    store: Store,
    saga_id: str,
    name: str,
    input: Mapping[str, Any],
    *,
    publish: bool,
    lineage: Mapping[str, str] | None = None,
) -> bool:
    """Record a new saga instance (``running``, no owner); False if ``saga_id`` exists.

    Args:
        lineage: kept in the ``saga_started`` event beside the input: the
            correlation id, cause and trace context (``wirework.saga.lineage``).

    Raises:
        SagaStateError: a saga of another name has this id.
    """
    async with store.transaction() as tx:
        now = await store.now(tx)
        created = await tx.execute(
            "INSERT INTO wirework_saga (saga_id, name, status, input, lease_until, created_at,"
            " updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (saga_id) DO NOTHING",
            saga_id,
            name,
            SagaStatus.RUNNING.value,
            orjson.dumps(dict(input)).decode(),
            0.0,
            now,
            now,
        )
        if not created:
            existing = await tx.fetchval(
                "SELECT name FROM wirework_saga WHERE saga_id = $1", saga_id
            )
            if existing != name:
                raise SagaStateError(
                    f"saga id {saga_id!r} is taken by a saga {existing!r}, not {name!r}; "
                    f"pass another saga_id (or none, for a fresh one)"
                )
            return False
        await _insert_event(
            tx,
            saga_id,
            now,
            Kind.SAGA_STARTED,
            SagaStatus.RUNNING,
            data={"input": input, **(lineage or {})},
        )
        if publish:
            await _publish(tx, saga_id, name, SagaStatus.RUNNING, "saga.started")
    return True


async def transition(
    store: Store,
    saga_id: str,
    owner: str,
    kind: Kind,
    status: SagaStatus,
    *,
    lease_timeout: float,
    step: str | None = None,
    attempt: int | None = None,
    data: Mapping[str, Any] | None = None,
    error: str | None = None,
    publish: tuple[str, str] | None = None,
) -> None:
    """Record one transition of a saga this orchestrator holds (see the module docstring).

    Args:
        publish: ``(event type, saga name)`` to publish the change through the outbox.

    Raises:
        SagaLeaseLostError: another orchestrator holds the saga; nothing was recorded.
    """
    async with store.transaction() as tx:
        now = await store.now(tx)
        ended = status.terminal
        changed = await tx.execute(
            "UPDATE wirework_saga SET status = $1, updated_at = $2, lease_until = $3,"
            " owner = $4, ended_at = $5, error = COALESCE($6, error), lease_timeout = $9"
            " WHERE saga_id = $7 AND owner = $8",
            status.value,
            now,
            0.0 if ended else now + lease_timeout,
            None if ended else owner,
            now if ended else None,
            error,
            saga_id,
            owner,
            lease_timeout,
        )
        if not changed:
            raise SagaLeaseLostError(
                f"saga {saga_id!r} is no longer held by orchestrator {owner!r} (its lease ran "
                f"out and another took it over); {kind.value} was not recorded here"
            )
        await _insert_event(tx, saga_id, now, kind, status, step=step, attempt=attempt, data=data)
        if publish is not None:
            event_type, name = publish
            await _publish(tx, saga_id, name, status, event_type, step=step, error=error)


async def claim(
    store: Store, owner: str, names: Sequence[str], *, lease_timeout: float, limit: int
) -> list[str]:
    """Take the lease of up to ``limit`` active sagas of these names that nobody holds."""
    if not names or limit <= 0:
        return []
    marks = ", ".join(f"${n}" for n in range(4, 4 + len(names)))
    active = f"status IN ('{_ACTIVE[0]}', '{_ACTIVE[1]}')"
    taken: list[str] = []
    async with store.transaction() as tx:
        now = await store.now(tx)
        # "Far ahead" is judged by the clock when the row is (re-)checked: the holder may
        # have renewed after ``now`` was read (PostgreSQL re-checks after waiting for the
        # holder's row lock), and a lease it wrote at a later time than ``now`` is not from
        # a clock that went back. Read early, two orchestrators both drove a saga.
        clock = _CLOCK[tx.dialect]
        # Each lease is judged by its own length (another orchestrator may lease for
        # longer); a row written before the length was kept is judged by the claimer's.
        length = "CASE WHEN lease_timeout > 0 THEN lease_timeout ELSE $2 END"
        ahead = f"{clock} + {length} + {_CLOCK_SLACK}"
        free = f"(owner IS NULL OR lease_until <= $1 OR lease_until > {ahead}) AND {active}"
        rows = await tx.fetch(
            f"SELECT saga_id FROM wirework_saga WHERE {free} AND name IN ({marks})"
            " ORDER BY updated_at LIMIT $3",
            now,
            lease_timeout,
            limit,
            *names,
        )
        for row in rows:
            # Re-checked under the row lock (PostgreSQL): only one racer's UPDATE matches.
            changed = await tx.execute(
                "UPDATE wirework_saga SET owner = $3, lease_until = $4, lease_timeout = $2"
                f" WHERE saga_id = $5 AND {free}",
                now,
                lease_timeout,
                owner,
                now + lease_timeout,
                row["saga_id"],
            )
            if changed:
                taken.append(row["saga_id"])
    return taken


async def renew(
    store: Store, saga_ids: Sequence[str], owner: str, *, lease_timeout: float
) -> set[str]:
    """Extend this orchestrator's leases on these sagas; the ids it still holds."""
    if not saga_ids:
        return set()
    marks = ", ".join(f"${n}" for n in range(4, 4 + len(saga_ids)))
    again = ", ".join(f"${n}" for n in range(2, 2 + len(saga_ids)))
    async with store.transaction() as tx:
        now = await store.now(tx)
        await tx.execute(
            "UPDATE wirework_saga SET lease_until = $1, lease_timeout = $3"
            f" WHERE owner = $2 AND saga_id IN ({marks})",
            now + lease_timeout,
            owner,
            lease_timeout,
            *saga_ids,
        )
        rows = await tx.fetch(
            f"SELECT saga_id FROM wirework_saga WHERE owner = $1 AND saga_id IN ({again})",
            owner,
            *saga_ids,
        )
    return {row["saga_id"] for row in rows}


async def release(store: Store, saga_id: str, owner: str) -> None:
    """Give up the lease at once, so another orchestrator can resume the saga."""
    async with store.transaction() as tx:
        await tx.execute(
            "UPDATE wirework_saga SET owner = NULL, lease_until = 0 WHERE saga_id = $1"
            " AND owner = $2",
            saga_id,
            owner,
        )


async def load(store: Store, saga_id: str) -> SagaHistory:
    """The saga and its whole history.

    Raises:
        SagaNotFoundError: no saga has this id.
    """
    async with store.transaction() as tx:
        row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM wirework_saga WHERE saga_id = $1", saga_id)
        if row is None:
            raise SagaNotFoundError(
                f"no saga {saga_id!r} in the store; list them with `wirework saga list`"
            )
        events = await tx.fetch(
            "SELECT seq, saga_id, at, kind, step, attempt, status, data FROM wirework_saga_event"
            " WHERE saga_id = $1 ORDER BY seq",
            saga_id,
        )
    return SagaHistory(saga=_record(row), events=[_event(one) for one in events])


async def find(
    store: Store,
    *,
    status: SagaStatus | None = None,
    name: str | None = None,
    limit: int = 100,
) -> list[SagaRecord]:
    """Saga instances, newest first, optionally of one status and one saga name."""
    where: list[str] = []
    args: list[Any] = []
    if status is not None:
        args.append(SagaStatus(status).value)
        where.append(f"status = ${len(args)}")
    if name is not None:
        args.append(name)
        where.append(f"name = ${len(args)}")
    args.append(limit)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    async with store.transaction() as tx:
        rows = await tx.fetch(
            f"SELECT {_COLUMNS} FROM wirework_saga{clause}"
            f" ORDER BY created_at DESC, saga_id LIMIT ${len(args)}",
            *args,
        )
    return [_record(row) for row in rows]


async def mark_retry(store: Store, saga_id: str, *, publish: bool) -> SagaRecord:
    """Turn a ``compensation_failed`` saga back to ``compensating`` for an orchestrator to drive.

    Raises:
        SagaNotFoundError: no saga has this id.
        SagaStateError: the saga did not end ``compensation_failed``.
    """
    async with store.transaction() as tx:
        row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM wirework_saga WHERE saga_id = $1", saga_id)
        if row is None:
            raise SagaNotFoundError(
                f"no saga {saga_id!r} in the store; list them with `wirework saga list`"
            )
        if row["status"] != SagaStatus.COMPENSATION_FAILED.value:
            raise SagaStateError(
                f"saga {saga_id!r} is {row['status']}; only a compensation_failed saga can be "
                f"retried (`wirework saga list --status compensation_failed`)"
            )
        now = await store.now(tx)
        await tx.execute(
            "UPDATE wirework_saga SET status = $1, owner = NULL, lease_until = 0,"
            " ended_at = NULL, updated_at = $2 WHERE saga_id = $3",
            SagaStatus.COMPENSATING.value,
            now,
            saga_id,
        )
        await _insert_event(tx, saga_id, now, Kind.SAGA_RETRIED, SagaStatus.COMPENSATING)
        if publish:
            await _publish(tx, saga_id, row["name"], SagaStatus.COMPENSATING, "saga.retried")
    return _record(
        {
            **row,
            "status": SagaStatus.COMPENSATING.value,
            "owner": None,
            "lease_until": 0.0,
            "ended_at": None,
            "updated_at": now,
        }
    )


class Pruned(BaseModel):
    """What ``prune`` deleted (or, in a dry run, would delete)."""

    cutoff: datetime
    """Sagas that ended before this were pruned."""
    sagas: dict[SagaStatus, int]
    """Sagas deleted, by status (only statuses with some)."""
    events: int
    """History events deleted with them."""
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.sagas.values())


#: Sagas deleted per transaction by ``prune``, so a big backlog never holds long locks.
PRUNE_BATCH = 500


async def prune(
    store: Store,
    *,
    older_than: timedelta,
    include_failed: bool = False,
    dry_run: bool = False,
    batch: int = PRUNE_BATCH,
    limit: int | None = None,
) -> Pruned:
    """Delete the record and history of sagas that ended more than ``older_than`` ago.

    Only ``completed`` and ``compensated`` sagas, and ``compensation_failed``
    ones with ``include_failed`` (they wait for an operator's retry); a saga
    in flight is never touched, nor one retried while this runs. Sagas are
    deleted oldest first, ``batch`` per transaction, at most ``limit`` in
    all (None: every one); the cutoff is the store's clock at the start.

    Raises:
        ConfigurationError: a negative ``older_than``, a batch or limit below 1.
    """
    if older_than < timedelta(0):
        raise ConfigurationError(f"prune older_than must not be negative, got {older_than}")
    if batch < 1 or (limit is not None and limit < 1):
        raise ConfigurationError(f"prune batch and limit must be at least 1: {batch}, {limit}")
    statuses = [SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value]
    if include_failed:
        statuses.append(SagaStatus.COMPENSATION_FAILED.value)
    marks = ", ".join(f"${n}" for n in range(2, 2 + len(statuses)))
    # updated_at is ended_at for an ended saga; the condition on it uses the status index.
    ended = f"status IN ({marks}) AND updated_at < $1 AND ended_at IS NOT NULL AND ended_at < $1"
    async with store.transaction() as tx:
        cutoff = await store.now(tx) - older_than.total_seconds()
        if dry_run:
            rows = await tx.fetch(
                f"SELECT status, COUNT(*) AS n FROM wirework_saga WHERE {ended} GROUP BY status",
                cutoff,
                *statuses,
            )
            events = await tx.fetchval(
                "SELECT COUNT(*) FROM wirework_saga_event WHERE saga_id IN"
                f" (SELECT saga_id FROM wirework_saga WHERE {ended})",
                cutoff,
                *statuses,
            )
            return Pruned(
                cutoff=_when(cutoff),
                sagas={SagaStatus(row["status"]): int(row["n"]) for row in rows},
                events=int(events or 0),
                dry_run=True,
            )
    counts: dict[SagaStatus, int] = {}
    deleted_events = 0
    most = f"${2 + len(statuses)}"
    left = limit
    while True:
        size = batch if left is None else min(batch, left)
        async with store.transaction() as tx:
            # The outer condition is checked again under the row lock (PostgreSQL), so a
            # saga retried meanwhile stays, history and all.
            rows = await tx.fetch(
                "DELETE FROM wirework_saga WHERE saga_id IN (SELECT saga_id FROM wirework_saga"
                f" WHERE {ended} ORDER BY updated_at LIMIT {most}) AND {ended}"
                " RETURNING saga_id, status",
                cutoff,
                *statuses,
                size,
            )
            if rows:
                ids = ", ".join(f"${n}" for n in range(1, 1 + len(rows)))
                deleted_events += await tx.execute(
                    f"DELETE FROM wirework_saga_event WHERE saga_id IN ({ids})",
                    *(row["saga_id"] for row in rows),
                )
        for row in rows:
            status = SagaStatus(row["status"])
            counts[status] = counts.get(status, 0) + 1
        if left is not None:
            left -= len(rows)
        if len(rows) < size or left == 0:
            break
    return Pruned(cutoff=_when(cutoff), sagas=counts, events=deleted_events)
