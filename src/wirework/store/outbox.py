"""The transactional outbox: events written with the business data, published after commit.

``tx.publish(topic, event)`` writes the encoded event as a row in the same
transaction as the caller's own writes, so there are no zombie records (data
committed, event never sent) and no ghost messages (event sent, data rolled
back): RELIABILITY.md lesson 6 and P6. A ``Relay`` publishes committed rows.

How the relay keeps its promises:

* **At least once, one id.** A row is deleted only after the broker took it.
  A relay that dies between the publish and the delete publishes the row
  again after a restart, with the same CloudEvent id, which a downstream
  inbox absorbs.
* **Commit order per key.** Rows are numbered as they are written (``seq``).
  Transactions never overlap on SQLite, and on PostgreSQL the rows of one key
  take a lock on that key until their transaction ends, so within a key,
  ``seq`` order is commit order. The relay publishes each key's rows in
  ``seq`` order, one after the other (keys in parallel); a failed publish
  stops its key until the next round, never the others.
* **One relay at a time.** Relays of one store (in any process) share a lease
  row, ``wirework_relay_lease``: the holder renews it while it works, the
  others wait and take over once it runs out (``lease_timeout``), so two
  relays never interleave one key's rows. A relay checks that it still holds
  the lease before each batch; one paused past its lease may still publish the
  batch in hand once (a duplicate for the inbox, never a loss).
* **Prompt.** A commit with outbox rows wakes the relays of its process at
  once; other processes are woken by ``NOTIFY`` on PostgreSQL and find the
  rows by polling on SQLite (``min_poll``, doubling while idle up to
  ``max_poll``).
* **Bounded.** Published rows are deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from pydantic import BaseModel

from wirework.brokers.base import DEFAULT_MAX_MESSAGE_BYTES, Broker, check_name
from wirework.consumer import current_incoming
from wirework.envelope import Envelope, WireMessage, encode_binary, event_type
from wirework.errors import ConfigurationError, MessageTooLargeError, WireworkError
from wirework.faults import fault_point
from wirework.store.base import Row, Store, Transaction

log = logging.getLogger("wirework.store.outbox")


#: The one lease row of a store's relays: every relay reads every outbox row, so all of
#: them must share it (one lease per relay name would let two publish one key at once).
LEASE_NAME = "outbox"


async def write(
    tx: Transaction,
    topic: str,
    event: Envelope | BaseModel,
    *,
    key: str | None = None,
    type: str | None = None,
    source: str | None = None,
) -> Envelope:
    """Write ``event`` as an outbox row of ``tx``; returns the envelope that will be published.

    Args:
        tx: the open transaction the event commits (or rolls back) with.
        topic: where the relay publishes it.
        event: a ready envelope (its id is the message id downstream), or a
            body, wrapped in a new envelope of ``type`` (default: the model's
            ``__event_type__`` or class name) from ``source``; inside a
            handler it gets the handled message as its cause and correlation.
        key: the ordering key; default the envelope's ``key``. Rows of one key
            are published in commit order.

    Raises:
        ConfigurationError: an invalid topic name, or a body without ``source``.
        MessageTooLargeError: the encoded event is over 1 MiB; nothing was written.
    """
    check_name("topic", topic)
    if isinstance(event, Envelope):
        envelope = event
        if key is not None and envelope.key != key:
            envelope = envelope.model_copy(update={"key": key})
    else:
        source = source or tx.default_source
        if source is None:
            raise ConfigurationError(
                "tx.publish(topic, body) needs source= (e.g. '/orders') to build the "
                "envelope; or pass a ready Envelope"
            )
        name = type or event_type(event.__class__)
        # Inside a handler the event is caused by the handled message and joins its flow.
        incoming = current_incoming.get()
        cause = incoming.envelope if incoming is not None else None
        envelope = Envelope.new(
            name,
            event,
            source=source,
            key=key,
            causationid=cause.id if cause else None,
            correlationid=(cause.correlationid or cause.id) if cause else None,
        )
    if tx.stamp is not None:
        envelope = tx.stamp(topic, envelope)
    message = encode_binary(envelope)
    if message.size > DEFAULT_MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(message.size, DEFAULT_MAX_MESSAGE_BYTES, topic=topic)
    ordering = envelope.key
    if ordering is not None:
        await tx.lock_key(ordering)
    await tx.execute(
        "INSERT INTO wirework_outbox (topic, message_id, message_key, headers, body, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        topic,
        envelope.id,
        ordering,
        orjson.dumps(dict(message.headers)).decode(),
        message.body,
        await tx.store.now(tx),
    )
    tx.outbox_rows += 1
    fault_point("outbox.after_write")
    return envelope


@dataclass
class RelayStats:
    """Counts since start."""

    published: int = 0
    failed: int = 0
    """Publish attempts that raised (the row stays and is tried again)."""
    rounds: int = 0
    leases_taken: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds from a row's commit-side timestamp to its publish, last ``keep_latencies``."""


@dataclass(frozen=True)
class _OutboxRow:
    seq: int
    topic: str
    message_id: str
    key: str | None
    message: WireMessage
    created_at: float


class Relay:
    """Publishes a store's committed outbox rows to a broker; run it as a task.

    ``await relay.run()`` until ``await relay.stop()`` (or cancellation).
    Several relays of one store may run (in several processes): one publishes,
    the others stand by (see the module docstring).
    """

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        batch_size: int = 100,
        lease_timeout: float = 10.0,
        min_poll: float = 0.02,
        max_poll: float = 1.0,
        retry_pause: float = 0.5,
        keep_latencies: int = 10_000,
    ) -> None:
        if not 0 < min_poll <= max_poll:
            raise ConfigurationError(
                f"relay polling needs 0 < min_poll <= max_poll, got {min_poll} and {max_poll}"
            )
        if lease_timeout <= max_poll:
            raise ConfigurationError(
                f"relay lease_timeout {lease_timeout}s must be longer than max_poll {max_poll}s, "
                f"or a standby would take the lease from a relay that is only waiting"
            )
        self.store = store
        self.broker = broker
        self.name = LEASE_NAME
        self.batch_size = batch_size
        self.lease_timeout = lease_timeout
        self.min_poll = min_poll
        self.max_poll = max_poll
        self.retry_pause = retry_pause
        self.holder = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.stats = RelayStats()
        self._keep = keep_latencies
        self._stop = asyncio.Event()
        self._lease_until = 0.0
        """The store's clock time until which this relay holds the lease (0: not held)."""

    async def stop(self) -> None:
        """Ask ``run`` to return after the round in hand (it gives up the lease)."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until ``stop``; store and broker errors are logged and retried, never fatal."""
        pause = self.min_poll
        try:
            while not self._stop.is_set():
                generation = self.store.outbox_generation
                try:
                    done = await self.round()
                except WireworkError as exc:
                    self.stats.failed += 1
                    log.warning("outbox relay %s: %s; trying again", self.name, exc)
                    await self._wait(generation, self.retry_pause)
                    continue
                if done is None:  # another relay holds the lease
                    await self._wait(self.store.outbox_generation, self.lease_timeout / 3)
                    continue
                if done:
                    pause = self.min_poll
                    continue
                await self._wait(generation, pause)
                pause = min(pause * 2, self.max_poll)
        finally:
            await asyncio.shield(self._release())

    async def round(self) -> int | None:
        """One pass: publish up to ``batch_size`` rows; None if another relay holds the lease.

        Returns how many rows were published and deleted.
        """
        self.stats.rounds += 1
        rows = await self._take()
        if rows is None:
            return None
        if not rows:
            return 0
        published = await self._publish(rows)
        fault_point("outbox.after_publish_before_mark")
        if published:
            marks = ", ".join(f"${n}" for n in range(1, len(published) + 1))
            async with self.store.transaction() as tx:
                await tx.execute(f"DELETE FROM wirework_outbox WHERE seq IN ({marks})", *published)
        return len(published)

    async def _take(self) -> list[_OutboxRow] | None:
        """Renew (or take) the lease and read the oldest rows, in one transaction."""
        async with self.store.transaction() as tx:
            now = await self.store.now(tx)
            if not await self._lease(tx, now):
                return None
            found = await tx.fetch(
                "SELECT seq, topic, message_id, message_key, headers, body, created_at"
                " FROM wirework_outbox ORDER BY seq LIMIT $1",
                self.batch_size,
            )
        return [_row(one) for one in found]

    async def _lease(self, tx: Transaction, now: float) -> bool:
        """Hold the lease for another ``lease_timeout``, if it is free, ours, or run out.

        A lease that ends further ahead than one ``lease_timeout`` was written
        by a clock that has since gone back: it counts as run out.
        """
        if self._lease_until - now > self.lease_timeout / 2:
            return True  # renewed recently enough: no write needed this round
        # One statement, so that two relays racing for a free lease cannot both win: the
        # second waits for the first's row (PostgreSQL) and then finds it taken.
        taken = await tx.execute(
            "INSERT INTO wirework_relay_lease (name, holder, expires_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (name) DO UPDATE"
            " SET holder = excluded.holder, expires_at = excluded.expires_at"
            " WHERE wirework_relay_lease.holder = excluded.holder"
            " OR wirework_relay_lease.expires_at <= $4"
            " OR wirework_relay_lease.expires_at > $3",
            self.name,
            self.holder,
            now + self.lease_timeout,
            now,
        )
        if not taken:
            self._lease_until = 0.0
            return False
        if not self._lease_until:
            self.stats.leases_taken += 1
            log.info("outbox relay %s (%s) took the lease", self.name, self.holder)
        self._lease_until = now + self.lease_timeout
        return True

    async def _release(self) -> None:
        if not self._lease_until:
            return
        self._lease_until = 0.0
        try:
            async with self.store.transaction() as tx:
                await tx.execute(
                    "DELETE FROM wirework_relay_lease WHERE name = $1 AND holder = $2",
                    self.name,
                    self.holder,
                )
        except WireworkError as exc:  # it runs out by itself
            log.warning("outbox relay %s could not give up its lease: %s", self.name, exc)

    async def _publish(self, rows: Sequence[_OutboxRow]) -> list[int]:
        """Publish each key's rows in order, keys in parallel; the seqs that went out."""
        chains: dict[str | int, list[_OutboxRow]] = {}
        for row in rows:
            chains.setdefault(row.key if row.key is not None else row.seq, []).append(row)
        done: list[int] = []

        async def chain(items: list[_OutboxRow]) -> None:
            for row in items:
                try:
                    await self.broker.publish(row.topic, row.message, key=row.key)
                except WireworkError as exc:
                    self.stats.failed += 1
                    log.warning(
                        "outbox relay %s could not publish %s to %s (%s); it stays, with "
                        "the rest of key %r, for the next round",
                        self.name,
                        row.message_id,
                        row.topic,
                        exc,
                        row.key,
                    )
                    return
                done.append(row.seq)
                self.stats.published += 1
                self._latency(row)

        async with asyncio.TaskGroup() as group:
            for items in chains.values():
                group.create_task(chain(items))
        return done

    def _latency(self, row: _OutboxRow) -> None:
        latencies = self.stats.latencies
        latencies.append(time.time() - row.created_at)
        if len(latencies) > self._keep:
            del latencies[: len(latencies) - self._keep]

    async def _wait(self, generation: int, timeout: float) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(self.store.wait_outbox(generation, timeout))
        try:
            await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, wake):
                task.cancel()
            # Let them finish their cancellation (the store may be closing a connection
            # it was opening to listen): a relay that returns leaves nothing running.
            await asyncio.gather(stop, wake, return_exceptions=True)


def _row(found: Row) -> _OutboxRow:
    headers: dict[str, str] = orjson.loads(found["headers"])
    return _OutboxRow(
        seq=int(found["seq"]),
        topic=found["topic"],
        message_id=found["message_id"],
        key=found["message_key"],
        message=WireMessage(headers=headers, body=bytes(found["body"])),
        created_at=float(found["created_at"]),
    )
