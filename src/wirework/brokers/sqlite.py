"""The embedded default broker: one SQLite file, shared by every process that opens it.

Durable: ``publish`` returns after the commit, in WAL mode, and under
``durability="strict"`` (the default) after the WAL's sync too, so a
returned publish survives a process crash *and* a power loss. The file is
opened with ``synchronous=FULL``; the commits the event loop runs are made
without a sync and followed by SQLite's own ``fdatasync`` of the WAL on a
thread of its own, off the write lock (``sqlite_wal_sync``): a message is
visible to consumers from its commit, a few hundred microseconds before its
publish returns, as RabbitMQ delivers before it confirms. ``"fast"``
(``synchronous=NORMAL``) still survives any process crash, but the last
commits before an OS crash or power loss may roll back (SQLite's documented
WAL/NORMAL window); choose it only where a replayable source exists. A
claim alone is committed without an fsync even under ``"strict"``: a power
loss releases every lease anyway (see below), so at most its attempt goes
uncounted.

Acks are at-least-once bookkeeping, so they are not synced: a transaction of
acks and claims alone commits with ``synchronous=NORMAL``, even under
``"strict"``; any transaction holding a publish (or a nack, a dead-letter, a
replay) is synced as the file asks, at its commit or just after. ``ack()``
returns after the commit, so a process crash undoes no returned ack. The
window: an ack is on disk once the next synced commit on the file (any
publish, from any process) or the next checkpoint has run, as the WAL is
replayed in order. A power loss or OS crash before that (a fraction of a
second while messages flow; up to the next publish when idle) undoes the ack,
and the message is delivered again, which at-least-once already allows
(RELIABILITY.md P1 and P3 hold: the inbox absorbs the duplicate).
``docs/backends/sqlite.md`` has the details.

Processes on one machine share the file: competing consumers and groups may
live in different processes; leases use the machine-wide monotonic clock, so a
killed process's messages go to another consumer when its lease runs out.

Limits, stated loudly: one machine only (SQLite over a network filesystem is
not safe); after a reboot, leases are released and pending delays end at once
(monotonic time restarts at boot); ``max_queue_length`` counts rows on every
publish, so it costs an index scan per publish while set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.brokers import sqlite_ops as ops
from wirework.brokers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Broker,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    Failure,
    GroupStats,
    Subscription,
    check_name,
)
from wirework.brokers.sqlite_wake import Doorbell
from wirework.brokers.sqlite_writer import Batch, Committed, Operation, Step, Writer, each
from wirework.clock import SYSTEM_CLOCK, Clock, wait_first
from wirework.envelope import WireMessage
from wirework.errors import (
    AlreadySettledError,
    BrokerBusyError,
    BrokerClosedError,
    ConfigurationError,
)
from wirework.sqlite_wal import use_wal

#: Valid topic names a broker remembers, not to check them again on every publish.
_TOPICS_REMEMBERED = 1024

#: Pause before a subscription claims again after the file was locked past busy_timeout.
_BUSY_RETRY_PAUSE = 0.05

#: WAL pages between checkpoints under ``durability="fast"`` (SQLite's default is 1,000).
#: There the checkpoints are the only fsyncs, and the same hot pages are copied at each:
#: 4,000 (a WAL of up to 16 MiB) gave +9 % msg/s with 8 publishers (median of 7 paired
#: runs); under ``strict`` every publish is synced anyway, and it changed nothing.
FAST_CHECKPOINT_PAGES = 4000
#: WAL pages between checkpoints under ``strict``: SQLite's own default.
SQLITE_CHECKPOINT_PAGES = 1000


class SqliteSettings(BaseSettings):
    """Settings of ``sqlite:///...``; also read from ``WIREWORK_SQLITE_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_SQLITE_", extra="forbid")

    durability: Literal["strict", "fast"] = "strict"
    busy_timeout: float = Field(default=5.0, gt=0)
    """Seconds an operation waits for another process's write lock before BrokerBusyError."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    max_queue_length: int | None = Field(default=None, gt=0)
    """Messages a topic may hold; a publish beyond it fails with QueueFullError."""
    poll_interval: float = Field(default=1.0, gt=0, le=60)
    """Longest an idle subscriber sleeps without a doorbell (leases, delays, safety net)."""


class SqliteBroker(Broker):
    """A durable broker in one SQLite file; see the module docstring for its promises."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        settings: SqliteSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or SqliteSettings()
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigurationError(
                f"the directory for the SQLite broker file {str(self.path)!r} does not exist; "
                f"create {str(self.path.parent)!r} first or point the URL elsewhere"
            )
        self.max_message_bytes = self.settings.max_message_bytes
        self._clock = clock or SYSTEM_CLOCK
        self._writer: Writer | None = None
        self._doorbell = Doorbell()
        self._closed = False
        self._closing = asyncio.Event()
        self._held: set[SqliteDelivery] = set()
        self._listening: set[str] = set()
        self._topics_seen: set[str] = set()
        """Topic names published to and found valid."""
        self.stale_settles = 0
        max_length = self.settings.max_queue_length
        self._publish_bounded = max_length is None
        self._publish_step: Step = lambda conn, batch, records: ops.publish(
            conn, batch, records, max_length
        )

    # -- plumbing -----------------------------------------------------------------

    def _open_connection(self) -> sqlite3.Connection:
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        connection = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.settings.busy_timeout,
        )
        try:
            use_wal(connection, self.settings.busy_timeout)
            sync = "FULL" if self.settings.durability == "strict" else "NORMAL"
            connection.execute(f"PRAGMA synchronous = {sync}")
            connection.execute("PRAGMA wal_autocheckpoint = 0")  # the writer's, off the loop
            ops.migrate(connection, now=self._clock.monotonic())
        except sqlite3.OperationalError as exc:
            connection.close()
            if "locked" in str(exc).lower() or "busy" in str(exc).lower():
                raise BrokerBusyError(
                    f"the SQLite broker file {str(self.path)!r} is locked by another process "
                    f"for more than busy_timeout={self.settings.busy_timeout}s; retry later"
                ) from exc
            raise ConfigurationError(
                f"{str(self.path)!r} is not a usable wirework SQLite broker file ({exc}); "
                f"point the URL at a new file or at one wirework created"
            ) from exc
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise ConfigurationError(
                f"{str(self.path)!r} is not a usable wirework SQLite broker file ({exc}); "
                f"point the URL at a new file or at one wirework created"
            ) from exc
        return connection

    def _after_commit(self, batch: Batch) -> Callable[[], None]:
        """Runs after the commit (on the loop or the writer's thread): ring other processes;
        returns the waking of our own, for the loop."""
        gone = self._doorbell.ring(
            (address, topic)
            for topic, addresses in batch.listeners.items()
            for address in addresses
        )
        topics = set(batch.listeners)

        def wake() -> None:
            self._doorbell.wake_local(topics)
            if gone and not self._closed:
                self._call(ops.forget_listeners, gone)

        return wake

    def _call(self, operation: Any, *args: Any, **flags: bool) -> asyncio.Future[Any]:
        """Queue a one-off operation: ``operation(connection, batch, *args)``.

        ``flags``: ``read_only``, ``durable``, ``bounded``, as ``Writer.submit`` takes them.
        """
        return self._submit(each, _OneOff(operation, args), **flags)

    def _submit(self, step: Step, request: Any, **flags: bool) -> asyncio.Future[Any]:
        return self._started_writer().submit(step, request, **flags)

    def _started_writer(self) -> Writer:
        if self._writer is None:
            self._loop = asyncio.get_running_loop()
            self._writer = Writer(
                self._open_connection,
                busy_timeout=self.settings.busy_timeout,
                after_commit=self._after_commit,
                loop=self._loop,
                checkpoint_pages=(
                    FAST_CHECKPOINT_PAGES
                    if self.settings.durability == "fast"
                    else SQLITE_CHECKPOINT_PAGES
                ),
            )
            self._doorbell_on = self._doorbell.start(self._loop)
        return self._writer

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"the SQLite broker on {str(self.path)!r} is closed")

    # -- the contract ------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self._check_open()
        if topic not in self._topics_seen:  # else a regex match on every publish
            if len(self._topics_seen) >= _TOPICS_REMEMBERED:
                self._topics_seen.clear()  # many topics (replies, say): bounded memory
            self._topics_seen.add(check_name("topic", topic))
        self.check_size(topic, message)
        headers = message.headers
        record = ops.NewMessage(
            topic,
            key,
            orjson.dumps(headers if type(headers) is dict else dict(headers)),
            message.body,
            self._clock.monotonic() + max(0.0, delay),
            time.time(),
        )
        # With max_queue_length, a publish counts the topic's rows: not bounded by its size.
        await self._submit(self._publish_step, record, bounded=self._publish_bounded)

    async def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        self._check_open()
        topic, group = subscription.topic, subscription.group
        await self._call(
            ops.ensure_group, topic, group, subscription.start, self._clock.monotonic()
        )
        if topic not in self._listening and self._doorbell_on:
            self._listening.add(topic)
            await self._call(ops.listen, self._doorbell.address, topic)
        wake = self._doorbell.waiter(topic)
        mine: set[SqliteDelivery] = set()
        ready: deque[SqliteDelivery] = deque()
        room = asyncio.Event()
        claiming: asyncio.Future[Any] | None = None
        try:
            while not self._closed:
                free = subscription.prefetch - len(mine)
                if claiming is None and free > 0 and len(ready) <= free:
                    # Claim ahead once there is room for as many as still wait: the claim
                    # rides in the transaction of the acks and its rows are here before the
                    # last ready one is taken. Claiming only when empty cost the consumer a
                    # commit of waiting every few rounds: with 8 strict publishers this is
                    # +19 % msg/s and a quarter fewer commits (median of 5 paired runs).
                    wake.clear()
                    claiming = self._submit_claim(subscription, free)
                if ready:
                    yield ready.popleft()
                    continue
                if claiming is None:
                    room.clear()
                    await self._wait(room, None)
                    continue
                try:
                    # Shielded: a cancelled subscription still gets the rows, to hand back.
                    claimed, next_due = await asyncio.shield(claiming)
                except BrokerBusyError:
                    # Another process held the write lock past busy_timeout: a passing
                    # state, and only a close may end a subscription. Claim again.
                    claiming = None
                    await self._wait(wake, min(self.settings.poll_interval, _BUSY_RETRY_PAUSE))
                    continue
                claiming = None
                batch = [SqliteDelivery(self, row, mine, room) for row in claimed]
                # Held before any is yielded, so leaving early hands back the unseen too.
                mine.update(batch)
                self._held.update(batch)
                ready.extend(batch)
                if claimed:
                    continue
                pause = self.settings.poll_interval
                if next_due is not None:
                    pause = min(pause, max(0.0, next_due - self._clock.monotonic()) + 0.001)
                await self._wait(wake, pause)
        finally:
            self._doorbell.forget(topic, wake)
            unsettled = [d for d in mine if not d.settled]
            self._held.difference_update(unsettled)
            if not self._closed:
                # Not marked settled: a late settle finds the token moved on and is
                # counted as stale, as after a lease ran out.
                handles = [d.handle for d in unsettled] + await self._claimed_late(claiming)
                if handles:
                    released = self._call(
                        ops.release, handles, self._clock.monotonic(), bounded=True
                    )
                    await asyncio.shield(released)

    def _submit_claim(self, subscription: Subscription, limit: int) -> asyncio.Future[Any]:
        # Not durable: a lease lost to a power cut only means the message is claimed again.
        return self._call(
            ops.claim,
            subscription.topic,
            subscription.group,
            limit,
            self._clock.monotonic(),
            subscription.lease_timeout,
            durable=False,
            bounded=True,
        )

    async def _claimed_late(self, claiming: asyncio.Future[Any] | None) -> list[ops.Handle]:
        """The rows of a claim still in flight when its subscription ended, to hand back."""
        if claiming is None:
            return []
        try:
            claimed, _ = await asyncio.shield(claiming)
        except Exception:  # it failed: it leased nothing
            return []
        return [row.handle for row in claimed]

    async def _wait(self, event: asyncio.Event, pause: float | None) -> None:
        await wait_first(event, self._closing, clock=self._clock, pause=pause)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._writer is not None:
            held = [d for d in self._held if not d.settled]
            for delivery in held:
                delivery.mark_settled()
            now = self._clock.monotonic()
            handles = [d.handle for d in held]
            address = [self._doorbell.address]
            if held:
                await self._call_closing(lambda c, b: ops.release(c, b, handles, now))
            if self._listening:
                await self._call_closing(lambda c, b: ops.forget_listeners(c, b, address))
            await self._writer.stop()
        self._doorbell.close()

    async def _call_closing(self, operation: Operation) -> None:
        """Last writes on close; if they fail, leases run out and the messages come back."""
        if self._writer is None:
            return
        with contextlib.suppress(Exception):
            await self._writer.submit(each, operation)

    # -- dead letters and inspection --------------------------------------------

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        self._check_open()
        rows = await self._call(
            ops.list_dead_letters,
            topic,
            group,
            reason.value if reason else None,
            limit,
            read_only=True,
        )
        return [ops.to_dead_letter(row) for row in rows]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        self._check_open()
        row = await self._call(ops.get_dead_letter, dead_letter_id, read_only=True)
        return ops.to_dead_letter(row)

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        self._check_open()
        return int(
            await self._call(
                ops.replay, list(dead_letter_ids), self._clock.monotonic(), time.time()
            )
        )

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group now, at its start position, as ``subscribe`` would on first use."""
        self._check_open()
        await self._call(
            ops.ensure_group,
            subscription.topic,
            subscription.group,
            subscription.start,
            self._clock.monotonic(),
        )

    async def delete_group(self, topic: str, group: str) -> None:
        """Forget a group and its undelivered messages; a topic left without groups goes too."""
        self._check_open()
        await self._call(ops.delete_group, topic, group)
        self._listening.discard(topic)

    @property
    def commit_counts(self) -> tuple[int, int]:
        """(transactions committed, operations in them) since open: group commit at work."""
        if self._writer is None:
            return (0, 0)
        return (self._writer.commits, self._writer.operations)

    @property
    def synced_commits(self) -> int:
        """Syncs of writing transactions: commits at the file's level (an fsync under
        strict), and under strict the WAL's syncs after the loop's commits, each for all
        commits made before it. The others held only acks and claims (module docstring).
        """
        return 0 if self._writer is None else self._writer.synced

    def record_transactions(self) -> list[Committed]:
        """From now on, every transaction this broker commits is appended to the list returned.

        For ``bench.floor``, which replays a run's transactions (``operations_of``)
        with raw ``sqlite3``. It grows with every commit: for one run, not a service.
        """
        writer = self._started_writer()
        writer.record = []
        return writer.record

    def operations_of(self, committed: Committed) -> list[tuple[str, int]]:
        """What a recorded transaction ran, in order, with the size of each call.

        ``("publish", messages)``, ``("ack", handles)``, ``("claim", limit)``; any
        other operation as its function's name and 1.
        """
        operations: list[tuple[str, int]] = []
        for step, size, one_offs in committed.runs:
            if step is self._publish_step:
                operations.append(("publish", size))
            elif step is ops.ack:
                operations.append(("ack", size))
            elif step is each:
                for request in one_offs:
                    if isinstance(request, _OneOff) and request.operation is ops.claim:
                        _topic, _group, limit, *_ = request.args  # as _submit_claim passes them
                        operations.append(("claim", int(limit)))
                    else:
                        name = getattr(request, "operation", request).__name__
                        operations.append((str(name), 1))
            else:
                operations.append((getattr(step, "__name__", "step"), size))
        return operations

    async def stats(self) -> Sequence[GroupStats]:
        self._check_open()
        return list(await self._call(ops.stats, self._clock.monotonic(), read_only=True))

    # -- settling (called by SqliteDelivery) --------------------------------------

    async def _settle(
        self, delivery: SqliteDelivery, step: Step, request: Any, *, durable: bool = True
    ) -> None:
        await self._start_settle(delivery, step, request, durable=durable)

    def _start_settle(
        self, delivery: SqliteDelivery, step: Step, request: Any, *, durable: bool = True
    ) -> asyncio.Future[None]:
        """Queue a settle; the future ends after its commit (a stale one is counted)."""
        if self._closed:
            raise BrokerClosedError(
                f"the SQLite broker on {str(self.path)!r} closed before this delivery was settled; "
                f"its message will be delivered again"
            )
        self._held.discard(delivery)
        writer = self._started_writer()
        settled: asyncio.Future[None] = self._loop.create_future()
        writer.send(step, request, _Settling(self, settled), durable=durable, bounded=True)
        return settled


class _OneOff:
    """``operation(connection, batch, *args)``, run by the ``each`` step.

    A closure would do, but a recorded transaction (``record_transactions``) could
    not tell a claim, and its limit, from any other operation.
    """

    __slots__ = ("args", "operation")

    def __init__(self, operation: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.operation = operation
        self.args = args

    def __call__(self, connection: sqlite3.Connection, batch: Batch) -> Any:
        return self.operation(connection, batch, *self.args)


class _Settling:
    """Where the writer puts a settle's outcome: straight into the caller's future.

    A future of the writer's with a callback setting the caller's cost a future,
    a callback and a turn of the loop more on every ack.
    """

    __slots__ = ("_broker", "_future")

    def __init__(self, broker: SqliteBroker, future: asyncio.Future[None]) -> None:
        self._broker = broker
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def set_result(self, current: bool) -> None:
        if not current:  # the lease had run out: nothing changed (see Delivery)
            self._broker.stale_settles += 1
        self._future.set_result(None)

    def set_exception(self, error: BaseException) -> None:
        self._future.set_exception(error)


class SqliteDelivery(Delivery):
    """A claimed row: settling it is valid only while its lease token is current."""

    def __init__(
        self,
        broker: SqliteBroker,
        row: ops.Claimed,
        holder: set[SqliteDelivery],
        room: asyncio.Event,
    ) -> None:
        self._broker = broker
        self._holder = holder
        self._room = room
        self._settled = False
        self.handle = row.handle
        self.topic = row.handle.topic
        self.group = row.handle.group
        self.key = row.key
        self.attempt = row.attempts
        self.first_failure_at = (
            datetime.fromtimestamp(row.first_failure_at, UTC) if row.first_failure_at else None
        )
        self.message = WireMessage(orjson.loads(row.headers), row.body)  # positional: 1k less
        # Bytes bound the size (``exceeds``); text that another writer stored may not.
        headers_bound = len(row.headers) if type(row.headers) is bytes else 4 * len(row.headers)
        self._size_bound = headers_bound + len(row.body)

    def exceeds(self, limit: int) -> bool:
        """Counted only when the stored bytes are over ``limit``, which they bound from above.

        ``WireMessage.size`` counts the UTF-8 bytes of every header name and value.
        Their JSON quotes each string and writes every character as its UTF-8 bytes
        (orjson) or as an escape, never shorter than the bytes it stands for
        (``\\n`` 2 for 1, ``\\u00e9`` 6 for 2, a surrogate pair 12 for 4). Counting
        takes 8k instructions a message (callgrind). The publish still counts
        exactly: its count is also what refuses a header that is not text.
        """
        return self._size_bound > limit and self.message.size > limit

    @property
    def settled(self) -> bool:
        return self._settled

    def mark_settled(self) -> None:
        self._settled = True
        self._holder.discard(self)
        self._room.set()

    def _begin(self) -> None:
        if self._settled:
            raise AlreadySettledError(
                f"delivery of seq {self.handle.seq} on {self.topic}/{self.group} is already settled"
            )
        self.mark_settled()

    async def ack(self) -> None:
        """Returns once the ack is committed, without an fsync: see the module docstring."""
        await self.start_ack()

    def start_ack(self) -> asyncio.Future[None]:
        """The ack queued for the writer at once: no task, the writer's own future."""
        self._begin()
        return self._broker._start_settle(self, ops.ack, self.handle, durable=False)

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        self._begin()
        handle, wall = self.handle, time.time()
        available_at = self._broker._clock.monotonic() + max(0.0, delay)
        await self._broker._settle(
            self, each, lambda c, b: ops.nack(c, b, handle, available_at, error, wall)
        )

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        self._begin()
        handle, wall = self.handle, time.time()
        await self._broker._settle(
            self, each, lambda c, b: ops.dead_letter(c, b, handle, reason.value, error, wall)
        )
