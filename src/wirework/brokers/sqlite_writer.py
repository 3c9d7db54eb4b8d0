"""One thread that owns the SQLite connection and commits work in groups.

Every request (publish, claim, ack, ...) is queued by the event loop with its
*step*: a function of the connection that runs all requests of its kind. The
thread takes everything queued, runs it in one transaction and commits once,
so concurrent publishers and acks share an fsync (group commit) and the event
loop never blocks on disk. A request whose step gives one of our errors had
no effect (steps check before they write); its error is handed to its caller
alone.

Requests of one step run together: all publishes in one call, all acks in
another, then the one-off operations (claims among them, which so see what
the same transaction published or acked). Reordering is safe because every
request in a transaction was queued before any of them was answered, so none
depends on another's outcome; requests of one step keep their queue order.

When another process holds the write lock, each operation waits at most
``busy_timeout`` seconds from when it was queued, then fails with
``BrokerBusyError``: nothing hangs, and nothing half-happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wirework.errors import BrokerBusyError, BrokerError, BrokerUnavailableError, WireworkError

MAX_BATCH = 512
_BUSY_PAUSE_FIRST = 0.0001
_BUSY_PAUSE_MAX = 0.002
#: ``PRAGMA synchronous`` level NORMAL: in WAL mode, commits are not synced.
_NORMAL = 1


@dataclass
class Batch:
    """What the operations of one transaction ask for after the commit."""

    listeners: dict[str, list[str]] = field(default_factory=dict)
    """Topic -> doorbell addresses to ring once the transaction has committed."""


Operation = Callable[[sqlite3.Connection, Batch], Any]
"""A one-off operation, run by the ``each`` step: its result or our error is its outcome."""

Step = Callable[[sqlite3.Connection, Batch, list[Any]], list[Any]]
"""Runs every queued request of one kind; one outcome per request: a value or our error."""


class Reply(Protocol):
    """Where an outcome goes on the loop: the value, or our error, of one request.

    An ``asyncio.Future``, or anything that answers these three as one does.
    """

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


def each(connection: sqlite3.Connection, batch: Batch, operations: list[Operation]) -> list[Any]:
    """The step of one-off operations: run one by one, in queue order."""
    outcomes: list[Any] = []
    for operation in operations:
        try:
            outcomes.append(operation(connection, batch))
        except WireworkError as exc:
            outcomes.append(exc)
    return outcomes


@dataclass(frozen=True, slots=True)
class Committed:
    """One committed transaction as the writer ran it, for a replay of the same SQL.

    ``bench.floor`` replays a run's transactions with raw ``sqlite3``: the same
    statements, in the same order, on the same data (a backlog as deep as the
    broker's), so the floor measures the SQL the broker really ran.
    """

    at: float
    """``time.monotonic()`` just before the commit, with the write lock held: across
    processes on one file (the clock is machine-wide on Linux), the order of commits."""
    synced: bool
    """Committed at the file's own ``synchronous`` level (an fsync under strict)."""
    runs: tuple[tuple[Step, int, list[Operation]], ...]
    """Each step, in the order they ran, with its number of requests and, for ``each``
    alone, the operations: no other request is kept, not to hold every message."""


@dataclass(slots=True)
class _Queued:
    step: Step
    request: Any
    reply: Reply
    deadline: float
    read_only: bool
    durable: bool


class Writer:
    """The connection's thread; ``submit`` from the event loop, ``stop`` to finish.

    ``after_commit`` runs on this thread after a commit whose batch has listeners;
    the function it returns runs on the loop just after the outcomes are handed over.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        busy_timeout: float,
        after_commit: Callable[[Batch], Callable[[], None]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._connect = connect
        self._busy_timeout = busy_timeout
        self._after_commit = after_commit
        self._loop = loop
        self._queue: queue.SimpleQueue[list[_Queued] | None] = queue.SimpleQueue()
        self._outbox: list[_Queued] = []
        """Requests of this loop iteration, handed to the thread together by ``_flush``."""
        self._backlog: deque[_Queued] = deque()
        """Requests the thread took from the queue and has not run yet (its own)."""
        self._thread = threading.Thread(target=self._main, name="wirework-sqlite", daemon=True)
        self._started = False
        self._connection: sqlite3.Connection | None = None
        self._current_busy_ms = -1
        self._stopping = False
        self._opened_sync: int | None = None
        self._current_sync: int | None = None
        self._busy_pause = _BUSY_PAUSE_FIRST
        self.commits = 0
        """Transactions committed; with ``operations`` it shows how well commits are shared."""
        self.operations = 0
        self.synced = 0
        """Writing transactions committed at the file's own ``synchronous`` level."""
        self.record: list[Committed] | None = None
        """When a list, every committed transaction is appended to it (``Committed``).

        Off by default: a bench turns it on for one run, as it grows with every commit.
        """

    def submit(
        self, step: Step, request: Any, *, read_only: bool = False, durable: bool = True
    ) -> asyncio.Future[Any]:
        """Queue ``request`` for ``step``; the future gets its outcome after the commit.

        ``durable=False`` says that losing this request's commit in a power cut does
        no harm: a claim (after a reboot every lease is released anyway; at most its
        attempt goes uncounted). A transaction of such requests alone commits without
        an fsync, 0.4 ms less on the bench machine, which an idle consumer's claim
        would otherwise add to the publishes queued behind it. Its commit becomes
        durable with the next synced one, since the WAL is replayed in order.
        """
        future: asyncio.Future[Any] = self._loop.create_future()
        self.send(step, request, future, read_only=read_only, durable=durable)
        return future

    def send(
        self,
        step: Step,
        request: Any,
        reply: Reply,
        *,
        read_only: bool = False,
        durable: bool = True,
    ) -> None:
        """Queue ``request``; ``reply`` gets its outcome on the loop after the commit."""
        if not self._started:
            self._started = True
            self._thread.start()
        if not self._outbox:
            self._loop.call_soon(self._flush)
        deadline = time.monotonic() + self._busy_timeout
        self._outbox.append(_Queued(step, request, reply, deadline, read_only, durable))

    def _flush(self) -> None:
        """Hand this loop iteration's requests to the thread in one go.

        One queue put, and at most one wake-up of the thread, per loop iteration
        instead of per request: a put that wakes the blocked thread is a futex
        call, and the woken thread then competes with the loop for the GIL to
        start a transaction of one request. Now it finds the iteration's work at
        once. The cost is one loop iteration of delay, microseconds when idle.
        Requests still unflushed when the loop dies are lost as a killed
        process's are: nothing was promised for them (an ack's message comes
        back after its lease).
        """
        if self._outbox:
            self._queue.put(self._outbox)
            self._outbox = []

    async def stop(self) -> None:
        """Run everything queued so far, then end the thread."""
        if not self._started:
            return
        self._flush()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        try:
            while True:
                if not self._backlog:
                    if self._stopping:
                        break
                    items = self._queue.get()
                    if items is None:
                        break
                    self._backlog.extend(items)
                batch = self._waiting(MAX_BATCH)
                if self._connection is None and not self._open(batch):
                    continue
                self._run(batch)
        finally:
            if self._connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.close()

    def _waiting(self, limit: int) -> list[_Queued]:
        """Up to ``limit`` requests, oldest first, without waiting; notes a stop request."""
        backlog = self._backlog
        while len(backlog) < limit and not self._stopping:
            try:
                items = self._queue.get_nowait()
            except queue.Empty:
                break
            if items is None:
                self._stopping = True
            else:
                backlog.extend(items)
        return [backlog.popleft() for _ in range(min(limit, len(backlog)))]

    def _open(self, pending: list[_Queued]) -> bool:
        """Connect; if that fails, fail ``pending`` alone and try again with the next batch.

        Opening can need the write lock (a new file, a schema upgrade, the first
        open after a reboot), so a ``BrokerBusyError`` here is as passing as
        anywhere else: the broker must work once the lock is released.
        """
        error: WireworkError
        try:
            self._connection = self._connect()
        except WireworkError as exc:
            error = exc
        except sqlite3.Error as exc:
            error = BrokerUnavailableError(f"cannot open the SQLite broker: {exc}")
        else:
            return True
        self._resolve([(item.reply, error) for item in pending])
        return False

    def _run(self, pending: list[_Queued]) -> None:
        connection = self._connection
        assert connection is not None  # set in _main before any batch
        while pending:
            now = time.monotonic()
            expired = [item for item in pending if item.deadline <= now]
            if expired:
                busy = BrokerBusyError(
                    f"the SQLite broker file is locked by another process for more than "
                    f"busy_timeout={self._busy_timeout}s; nothing was written, retry later"
                )
                self._resolve([(item.reply, busy) for item in expired])
                pending = [item for item in pending if item.deadline > now]
                if not pending:
                    return
            if self._current_busy_ms != 0:
                # SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, far
                # longer than another process holds the lock: retry here, finely.
                connection.execute("PRAGMA busy_timeout = 0")
                self._current_busy_ms = 0
            read_only = all(item.read_only for item in pending)
            durable = any(item.durable for item in pending)
            try:
                self._sync(connection, durable=durable)
                connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    # Another process holds the lock for well under a millisecond, usually:
                    # retry soon, backing off to 2 ms so a long lock does not burn a core.
                    time.sleep(self._busy_pause)
                    self._busy_pause = min(self._busy_pause * 2, _BUSY_PAUSE_MAX)
                    continue
                self._busy_pause = _BUSY_PAUSE_FIRST
                self._resolve([(item.reply, _translate(exc)) for item in pending])
                return
            self._busy_pause = _BUSY_PAUSE_FIRST
            batch = Batch()
            ran: list[tuple[Step, int, list[Operation]]] | None = (
                [] if self.record is not None else None
            )
            try:
                absorb = not read_only and self._current_sync == self._opened_sync
                outcomes = self._steps(connection, batch, pending, absorb=absorb, ran=ran)
                at = time.monotonic() if ran is not None else 0.0
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                if _is_busy(exc):
                    continue
                self._resolve([(item.reply, _translate(exc)) for item in pending])
                return
            self.commits += 1
            self.operations += len(pending)
            synced = not read_only and self._current_sync == self._opened_sync
            self.synced += synced
            if self.record is not None and ran is not None:
                self.record.append(Committed(at, synced, tuple(ran)))
            self._resolve(outcomes, self._after_commit(batch) if batch.listeners else None)
            return

    def _steps(
        self,
        connection: sqlite3.Connection,
        batch: Batch,
        pending: list[_Queued],
        *,
        absorb: bool,
        ran: list[tuple[Step, int, list[Operation]]] | None,
    ) -> list[tuple[Reply, Any]]:
        """Run the steps of ``pending``; with ``absorb``, also of requests queued meanwhile.

        Absorbed requests join ``pending``, so a retried transaction has them too.
        They are mostly callers woken by the last commit: a consumer's ack that
        arrives while the next publish is being written shares its fsync instead
        of paying its own (one producer awaiting each publish: 1.0 commits a message
        instead of 1.5, +25 % msg/s, median of 4 paired runs). Never into a transaction
        synced less than the file asks (``absorb`` False there): a late publish needs
        its fsync. ``ran``, when given, gets each step as run (see ``Committed.runs``).
        """
        outcomes: list[tuple[Reply, Any]] = []
        late = pending
        while late:
            for items in _by_step(late):
                step, requests = items[0].step, [item.request for item in items]
                results = _run_step(connection, batch, step, requests)
                outcomes.extend(zip([item.reply for item in items], results, strict=True))
                if ran is not None:
                    ran.append((step, len(requests), requests if step is each else []))
            late = self._waiting(MAX_BATCH - len(pending)) if absorb else []
            pending.extend(late)
        return outcomes

    def _sync(self, connection: sqlite3.Connection, *, durable: bool) -> None:
        """Set ``synchronous`` for the next commit: as opened, or NORMAL if not durable."""
        if self._opened_sync is None:
            (self._opened_sync,) = connection.execute("PRAGMA synchronous").fetchone()
            self._current_sync = self._opened_sync
        wanted = self._opened_sync if durable else min(self._opened_sync, _NORMAL)
        if wanted != self._current_sync:
            connection.execute(f"PRAGMA synchronous = {int(wanted)}")
            self._current_sync = wanted

    def _resolve(
        self,
        outcomes: list[tuple[Reply, Any]],
        then: Callable[[], None] | None = None,
    ) -> None:
        """Hand outcomes to the loop, and run ``then`` there: one wake-up of the loop a batch."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(_settle_all, outcomes, then)


def _by_step(pending: list[_Queued]) -> list[list[_Queued]]:
    """Requests grouped by step in the order each step first appears; ``each`` last."""
    groups: dict[Step, list[_Queued]] = {}
    for item in pending:
        groups.setdefault(item.step, []).append(item)
    one_offs = groups.pop(each, None)
    return [*groups.values(), one_offs] if one_offs else list(groups.values())


def _run_step(
    connection: sqlite3.Connection, batch: Batch, step: Step, requests: list[Any]
) -> list[Any]:
    """One call of a step; our error raised by the step as a whole goes to all its requests."""
    try:
        return step(connection, batch, requests)
    except WireworkError as exc:
        return [exc] * len(requests)


def _settle_all(outcomes: list[tuple[Reply, Any]], then: Callable[[], None] | None) -> None:
    for reply, outcome in outcomes:
        if reply.done():
            continue
        if isinstance(outcome, BaseException):
            reply.set_exception(outcome)
        else:
            reply.set_result(outcome)
    if then is not None:
        then()


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _translate(exc: sqlite3.Error) -> BrokerError:
    if _is_busy(exc):
        return BrokerBusyError(f"the SQLite broker file is locked: {exc}")
    return BrokerUnavailableError(f"SQLite broker failed: {exc}")
