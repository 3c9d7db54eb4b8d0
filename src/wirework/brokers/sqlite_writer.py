"""The SQLite connection's writer: commits work in groups, on the loop or on its thread.

Every request (publish, claim, ack, ...) is queued by the event loop with its
*step*: a function of the connection that runs all requests of its kind. The
requests of one loop iteration run in one transaction with one commit, and
the writer's thread takes everything queued while it was busy the same way,
so concurrent publishers and acks share an fsync (group commit). A request
whose step gives one of our errors had no effect (steps check before they
write); its error is handed to its caller alone.

Where a transaction runs. The event loop runs it itself, at the end of the
iteration that queued it, when nothing can make it wait long: the thread has
nothing in hand, every request is bounded by its own size (a publish, a
claim, a settle; ``Writer.submit``), and the write lock is free at once.
Under ``durability="strict"`` the loop commits without a sync, and the
durable requests (publishes, nacks) are answered once a thread of its own has
synced the WAL after the commit (``sqlite_wal_sync``). Anything else goes to
the writer's thread, which waits on the disk and on other processes while the
loop goes on: a lock held by another process, statistics and listings, the
checkpoints; its own commits are synced by SQLite as the file asks. In one process
the GIL lets the loop and the thread take turns, not overlap
(``bench.gil_probe``), so handing a transaction to the thread bought
nothing but the hand-over: two wake-ups across cores, 20-60 us a
transaction. Running it on the loop gave +10-30 % msg/s in the SQLite
bench's workloads 1, 2 and 6 (docs/backends/sqlite.md). What the loop pays
is the transaction's time without disk waits: 60 us to 1 ms.

Checkpoints never run on the loop: SQLite's automatic one (a 10 ms copy and
fsync every few thousand pages) would run inside whichever commit crossed the
mark. The connection has it off, and the writer checkpoints on its thread
after as many changed rows as the WAL pages it keeps, a ratio it re-learns
from each checkpoint's page count, once its answers are on their way to the
loop.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from wirework.brokers.sqlite_wal_sync import WalSync
from wirework.errors import (
    BrokerBusyError,
    BrokerError,
    BrokerUnavailableError,
    PublishOutcomeUnknownError,
    WireworkError,
)
from wirework.faults import fault_point

MAX_BATCH = 512
#: Bounds of the rows changed between checkpoints, whatever a checkpoint's pages said.
_CHECKPOINT_MIN_CHANGES = 64
_CHECKPOINT_MAX_FACTOR = 8
_BUSY_PAUSE_FIRST = 0.0001
_BUSY_PAUSE_MAX = 0.002
#: ``PRAGMA synchronous`` level NORMAL: in WAL mode, commits are not synced.
_NORMAL = 1


@dataclass
class Batch:
    """What the operations of one transaction ask for after the commit."""

    listeners: dict[str, list[str]] = field(default_factory=dict)
    """Topic -> doorbell addresses to ring once the transaction has committed."""
    published: int = 0
    """Messages the transaction stores: it passes the ``publish.*`` crash points."""


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
    """Followed by an fsync under strict: committed at the file's own ``synchronous``
    level, or the last commit before one of the loop's syncs of the WAL."""
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
    bounded: bool


class Writer:
    """The connection's writer; ``submit`` from the event loop, ``stop`` to finish.

    ``after_commit`` runs after a commit whose batch has listeners, where the
    transaction ran (the loop or the thread); the function it returns runs on the
    loop just after the outcomes are settled. Under strict, on the loop, that is
    at the commit, while the publishes' outcomes wait for the WAL's sync: the
    commit is visible already, so waking its consumers waits for nothing.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        busy_timeout: float,
        after_commit: Callable[[Batch], Callable[[], None]],
        loop: asyncio.AbstractEventLoop,
        checkpoint_pages: int,
    ) -> None:
        """``connect`` must open with ``wal_autocheckpoint = 0``: checkpoints are the writer's.

        ``checkpoint_pages``: WAL pages to let grow between checkpoints, as SQLite's
        ``wal_autocheckpoint`` would.
        """
        self._connect = connect
        self._busy_timeout = busy_timeout
        self._after_commit = after_commit
        self._loop = loop
        self._queue: queue.SimpleQueue[list[_Queued] | None] = queue.SimpleQueue()
        self._outbox: list[_Queued] = []
        """Requests of this loop iteration, run together by ``_flush``."""
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
        self._handed = 0
        """Lists of requests handed to the thread and not yet all answered (see ``_flush``)."""
        self._handed_lock = threading.Lock()
        self._taken = 0
        """Of those, the lists the thread has taken from the queue (its own)."""
        self._stopped = False
        self._answers: list[tuple[list[tuple[Reply, Any]], Callable[[], None] | None]] = []
        """The thread's outcomes not yet sent to the loop (its own)."""
        self._checkpoint_pages = checkpoint_pages
        self._checkpoint_every = checkpoint_pages
        """Rows changed between checkpoints: pages wanted, by the last pages-per-change."""
        self._changes_checkpointed = 0
        self._checkpoint_due = False
        self._wal_sync: WalSync | None = None
        """Under strict, the WAL's sync after the loop's commits (``sqlite_wal_sync``)."""
        self._unsynced: list[tuple[Reply, Any]] = []
        """The loop's durable outcomes committed since the sync in flight began."""
        self._syncing: list[tuple[Reply, Any]] | None = None
        """The outcomes the sync in flight covers; None while none is."""
        self._sync_idle = asyncio.Event()
        self._sync_idle.set()
        self._unsynced_record: tuple[list[Committed], int] | None = None
        """The recorded commit the next sync follows: the floor syncs after it."""
        self.checkpoints = 0
        """Checkpoints the writer ran (SQLite's automatic one is off on its connection)."""
        self.commits = 0
        """Transactions committed; with ``operations`` it shows how well commits are shared."""
        self.commits_here = 0
        """Of those, the ones the loop ran itself."""
        self.operations = 0
        self.synced_at_commit = 0
        """Writing transactions committed at the file's own ``synchronous`` level."""
        self.synced_after = 0
        """Under strict, the loop's syncs of the WAL after its commits, one for all
        made before it. Counted apart: the loop counts these while the thread may
        count the others."""
        self.record: list[Committed] | None = None
        """When a list, every committed transaction is appended to it (``Committed``).

        Off by default: a bench turns it on for one run, as it grows with every commit.
        """

    def submit(
        self,
        step: Step,
        request: Any,
        *,
        read_only: bool = False,
        durable: bool = True,
        bounded: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue ``request`` for ``step``; the future gets its outcome after the commit.

        ``durable=False`` says that losing this request's commit in a power cut does
        no harm: a claim (after a reboot every lease is released anyway; at most its
        attempt goes uncounted), an ack. A transaction of such requests alone commits
        without an fsync, and on the loop under strict such a request is answered at
        the commit, not after the WAL's sync. Its commit becomes durable with the
        next synced one, since the WAL is replayed in order.

        ``bounded=True`` says its work is bounded by its own size (a publish, a
        claim, a settle), so the loop may run it itself (see the module docstring);
        anything that may scan or delete without bound (statistics, dead-letter
        listings, deleting a group) runs on the thread, never blocking the loop.
        """
        future: asyncio.Future[Any] = self._loop.create_future()
        self.send(step, request, future, read_only=read_only, durable=durable, bounded=bounded)
        return future

    def send(
        self,
        step: Step,
        request: Any,
        reply: Reply,
        *,
        read_only: bool = False,
        durable: bool = True,
        bounded: bool = False,
    ) -> None:
        """Queue ``request``; ``reply`` gets its outcome on the loop after the commit."""
        if not self._started:
            self._started = True
            self._thread.start()
        if not self._outbox:
            self._loop.call_soon(self._flush)
        deadline = time.monotonic() + self._busy_timeout
        self._outbox.append(_Queued(step, request, reply, deadline, read_only, durable, bounded))

    def _flush(self) -> None:
        """Run this loop iteration's requests as one transaction, here or on the thread.

        One transaction per loop iteration instead of per request, and at most one
        wake-up of the thread: a put that wakes the blocked thread is a futex call,
        and the woken thread then competes with the loop for the GIL to start a
        transaction of one request. The cost is one loop iteration of delay,
        microseconds when idle. Here (on the loop) only when nothing handed to the
        thread is still unanswered, so transactions keep the order their requests
        were queued in and the connection has one user at a time. Requests still
        unflushed when the loop dies are lost as a killed process's are: nothing was
        promised for them (an ack's message comes back after its lease).
        """
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        if self._may_run_here(items) and self._attempt(items, here=True):
            if self._checkpoint_due:
                self._hand_over([])  # the thread checkpoints, the loop goes on
            return
        self._hand_over(items)

    @property
    def synced(self) -> int:
        """Syncs of writing transactions: at their commit, or after it (strict, the loop)."""
        return self.synced_at_commit + self.synced_after

    def _may_run_here(self, items: list[_Queued]) -> bool:
        """Nothing in the thread's hands, bounded work, and a commit that waits for no fsync
        (under strict the WAL's sync thread syncs after it)."""
        if self._handed or self._stopped or self._connection is None or self._opened_sync is None:
            return False
        if not all(item.bounded for item in items):
            return False
        # Synced only under strict, and only if some request is durable; then the
        # WAL's own thread syncs after the commit, unless the file has no WAL path.
        return (
            self._opened_sync <= _NORMAL
            or self._wal_sync is not None
            or not any(item.durable for item in items)
        )

    def _hand_over(self, items: list[_Queued]) -> None:
        with self._handed_lock:
            self._handed += 1
        self._queue.put(items)

    async def stop(self) -> None:
        """Run everything queued so far, then end the thread."""
        if not self._started:
            return
        self._stopped = True
        self._flush()
        # Before the thread closes the connection: the last one to close checkpoints
        # and deletes the WAL, which a later sync would then not find. Nothing is
        # added once stopped: everything goes to the thread, which syncs its commits.
        await self._sync_idle.wait()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        if self._wal_sync is not None:
            await self._wal_sync.close()

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
                    self._taken += 1
                batch = self._waiting(MAX_BATCH)
                if self._connection is not None or self._open(batch):
                    self._run(batch)
                self._after_batch()
        finally:
            if self._connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.close()

    def _after_batch(self) -> None:
        """Answers to the loop, a due checkpoint, and the connection back to the loop.

        The connection goes back once all the thread took is run, and before the
        answers when it can: a caller that is answered and queues again at once
        finds the loop free to run it. A due checkpoint comes after the answers,
        so the loop handles them while it copies and syncs (the GIL let go), and
        the connection goes back after it.
        """
        if not self._backlog and not self._checkpoint_due:
            self._give_back()
        self._send_answers()
        if self._checkpoint_due and self._connection is not None:
            self._checkpoint(self._connection)
        if not self._backlog:
            self._give_back()

    def _give_back(self) -> None:
        """What the thread took is all answered: the loop may use the connection again."""
        if self._taken:
            with self._handed_lock:
                self._handed -= self._taken
            self._taken = 0

    def _send_answers(self) -> None:
        """The thread's outcomes to the loop: one wake-up of the loop a batch."""
        answers, self._answers = self._answers, []
        for outcomes, then in answers:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(_settle_all, outcomes, then)

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
                self._taken += 1
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
        self._resolve([(item.reply, error) for item in pending], here=False)
        return False

    def _run(self, pending: list[_Queued]) -> None:
        """On the thread: ``pending`` in one transaction, waiting out another process's lock."""
        while pending:
            now = time.monotonic()
            expired = [item for item in pending if item.deadline <= now]
            if expired:
                busy = BrokerBusyError(
                    f"the SQLite broker file is locked by another process for more than "
                    f"busy_timeout={self._busy_timeout}s; nothing was written, retry later"
                )
                self._resolve([(item.reply, busy) for item in expired], here=False)
                self._send_answers()  # now: the others may wait on for a while
                pending = [item for item in pending if item.deadline > now]
                if not pending:
                    return
            if self._attempt(pending, here=False):
                return
            # Another process holds the lock for well under a millisecond, usually:
            # retry soon, backing off to 2 ms so a long lock does not burn a core.
            time.sleep(self._busy_pause)
            self._busy_pause = min(self._busy_pause * 2, _BUSY_PAUSE_MAX)

    def _attempt(self, pending: list[_Queued], *, here: bool) -> bool:
        """One try at ``pending`` as one transaction; False if the lock was busy: nothing ran.

        ``here``: on the loop, whose outcomes are settled at once; the thread's go
        to the loop in one call. Only the thread takes in requests queued meanwhile.
        """
        connection = self._connection
        assert connection is not None  # opened on the thread before any batch
        if self._current_busy_ms != 0:
            # SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, far
            # longer than another process holds the lock: the thread retries finely.
            connection.execute("PRAGMA busy_timeout = 0")
            self._current_busy_ms = 0
        read_only = all(item.read_only for item in pending)
        durable = any(item.durable for item in pending)
        # On the loop under strict: committed unsynced, its durable outcomes held for
        # the WAL's sync on its own thread (see ``sqlite_wal_sync``).
        sync_after = here and durable and not read_only and self._wal_sync is not None
        try:
            self._sync(connection, durable=durable and not sync_after)
            connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _is_busy(exc):
                return False
            self._busy_pause = _BUSY_PAUSE_FIRST
            self._resolve([(item.reply, _translate(exc)) for item in pending], here=here)
            return True
        self._busy_pause = _BUSY_PAUSE_FIRST
        batch = Batch()
        ran: list[tuple[Step, int, list[Operation]]] | None = (
            [] if self.record is not None else None
        )
        try:
            absorb = not here and not read_only and self._current_sync == self._opened_sync
            outcomes = self._steps(connection, batch, pending, absorb=absorb, ran=ran)
            at = time.monotonic() if ran is not None else 0.0
            if batch.published:
                fault_point("publish.before_commit")
            connection.execute("COMMIT")
        except Exception as exc:
            # Never left open: the next BEGIN, on the loop or the thread, would fail.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and _is_busy(exc):
                return False
            self._resolve([(item.reply, _translate(exc)) for item in pending], here=here)
            return True
        if batch.published:
            fault_point("publish.after_commit")  # committed; no publish of it has returned
        self.commits += 1
        self.commits_here += here
        self.operations += len(pending)
        synced = not read_only and self._current_sync == self._opened_sync
        self.synced_at_commit += synced
        if self.record is not None and ran is not None:
            self.record.append(Committed(at, synced, tuple(ran)))
            if sync_after:
                self._unsynced_record = (self.record, len(self.record) - 1)
        if connection.total_changes - self._changes_checkpointed >= self._checkpoint_every:
            self._checkpoint_due = True
        then = self._after_commit(batch) if batch.listeners else None
        if sync_after:
            outcomes = self._hold_for_sync(outcomes, pending)
        self._resolve(outcomes, then, here=here)
        return True

    def _hold_for_sync(
        self, outcomes: list[tuple[Reply, Any]], pending: list[_Queued]
    ) -> list[tuple[Reply, Any]]:
        """Keep the durable requests' results for the WAL's sync; return the rest.

        A durable request that failed wrote nothing, and a claim or an ack needs no
        sync (``submit``): they are answered now. A sync starts unless one is in
        flight; the commits made meanwhile wait for the next, one for them all.
        """
        durable = {id(item.reply) for item in pending if item.durable}
        now: list[tuple[Reply, Any]] = []
        for reply, outcome in outcomes:
            if id(reply) in durable and not isinstance(outcome, BaseException):
                self._unsynced.append((reply, outcome))
            else:
                now.append((reply, outcome))
        if self._syncing is None and self._unsynced:
            self._start_sync()
        return now

    def _start_sync(self) -> None:
        """Sync the WAL for every commit held so far (on the loop)."""
        assert self._wal_sync is not None
        self._syncing, self._unsynced = self._unsynced, []
        self._sync_idle.clear()
        self.synced_after += 1
        if self._unsynced_record is not None:
            record, index = self._unsynced_record
            record[index] = replace(record[index], synced=True)
            self._unsynced_record = None
        self._wal_sync.request()

    def _synced(self, error: Exception | None) -> None:
        """On the loop, after a sync: answer what it covered, start the next if any waits."""
        outcomes, self._syncing = self._syncing or [], None
        if error is not None:
            assert self._wal_sync is not None
            unknown = PublishOutcomeUnknownError(
                f"the SQLite broker committed, then could not sync {str(self._wal_sync.wal)!r} "
                f"to disk ({error}): the message may not survive a power loss; check the disk, "
                f"then publish again (an idempotent consumer absorbs the copy)"
            )
            outcomes = [(reply, unknown) for reply, _ in outcomes]
        _settle_all(outcomes, None)
        if self._unsynced:
            self._start_sync()
        else:
            self._sync_idle.set()

    def _checkpoint(self, connection: sqlite3.Connection) -> None:
        """A passive checkpoint, on the thread; learns the WAL pages a changed row costs.

        Passive: it copies what no reader still needs and never waits, as SQLite's
        automatic checkpoint does. One that fails is tried again after as many rows:
        nothing is lost, the WAL only grows meanwhile.
        """
        self._checkpoint_due = False
        changes = connection.total_changes - self._changes_checkpointed
        self._changes_checkpointed = connection.total_changes
        try:
            _, pages, _ = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return
        self.checkpoints += 1
        if pages > 0 and changes > 0:
            # Pages include other processes' writes: bounded, so one odd count does no harm.
            wanted = self._checkpoint_pages * changes // pages
            self._checkpoint_every = max(
                _CHECKPOINT_MIN_CHANGES,
                min(wanted, self._checkpoint_pages * _CHECKPOINT_MAX_FACTOR),
            )

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
            (opened,) = connection.execute("PRAGMA synchronous").fetchone()
            wal = _wal_of(connection)
            if opened > _NORMAL and wal is not None:  # before the loop may see opened
                self._wal_sync = WalSync(wal, loop=self._loop, synced=self._synced)
            self._current_sync = opened
            self._opened_sync = opened
        wanted = self._opened_sync if durable else min(self._opened_sync, _NORMAL)
        if wanted != self._current_sync:
            connection.execute(f"PRAGMA synchronous = {int(wanted)}")
            self._current_sync = wanted

    def _resolve(
        self,
        outcomes: list[tuple[Reply, Any]],
        then: Callable[[], None] | None = None,
        *,
        here: bool,
    ) -> None:
        """Settle outcomes on the loop and run ``then`` there: at once when ``here``,
        else once the thread is done with its batch (``_send_answers``)."""
        if here:
            _settle_all(outcomes, then)
        else:
            self._answers.append((outcomes, then))


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


def _wal_of(connection: sqlite3.Connection) -> Path | None:
    """The main database's WAL file, as SQLite names it (symbolic links resolved); None
    for a database without a file."""
    for _, name, file in connection.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(f"{file}-wal")
    return None


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _translate(exc: Exception) -> BrokerError:
    if not isinstance(exc, sqlite3.Error):  # a step's own bug: named, not a hang
        return BrokerError(f"SQLite broker step failed: {exc!r}")
    if _is_busy(exc):
        return BrokerBusyError(f"the SQLite broker file is locked: {exc}")
    return BrokerUnavailableError(f"SQLite broker failed: {exc}")
