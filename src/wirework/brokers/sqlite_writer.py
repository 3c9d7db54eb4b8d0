"""One thread that owns the SQLite connection and commits work in groups.

Every operation (publish, claim, ack, ...) is a function of the connection,
queued by the event loop. The thread takes everything queued, runs it in one
transaction and commits once, so concurrent publishers and acks share an fsync
(group commit) and the event loop never blocks on disk. An operation that
raises one of our errors had no effect (operations check before they write);
its error is handed to its caller alone.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wirework.errors import BrokerBusyError, BrokerError, BrokerUnavailableError, WireworkError

MAX_BATCH = 512
_BUSY_PAUSE_FIRST = 0.0001
_BUSY_PAUSE_MAX = 0.002


@dataclass
class Batch:
    """What the operations of one transaction ask for after the commit."""

    listeners: dict[str, list[str]] = field(default_factory=dict)
    """Topic -> doorbell addresses to ring once the transaction has committed."""


Operation = Callable[[sqlite3.Connection, Batch], Any]


@dataclass
class _Queued:
    run: Operation
    future: asyncio.Future[Any]
    deadline: float
    read_only: bool


class Writer:
    """The connection's thread; ``submit`` from the event loop, ``stop`` to finish."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        busy_timeout: float,
        after_commit: Callable[[Batch], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._connect = connect
        self._busy_timeout = busy_timeout
        self._after_commit = after_commit
        self._loop = loop
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="wirework-sqlite", daemon=True)
        self._started = False
        self._connection: sqlite3.Connection | None = None
        self._current_busy_ms = -1
        self._busy_pause = _BUSY_PAUSE_FIRST
        self.commits = 0
        """Transactions committed; with ``operations`` it shows how well commits are shared."""
        self.operations = 0

    def submit(self, run: Operation, *, read_only: bool = False) -> asyncio.Future[Any]:
        if not self._started:
            self._started = True
            self._thread.start()
        future: asyncio.Future[Any] = self._loop.create_future()
        deadline = time.monotonic() + self._busy_timeout
        self._queue.put(_Queued(run, future, deadline, read_only))
        return future

    async def stop(self) -> None:
        if not self._started:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        try:
            running = True
            while running:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        running = False
                        break
                    batch.append(item)
                if self._connection is None and not self._open(batch):
                    continue
                self._run(batch)
        finally:
            if self._connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.close()

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
        self._resolve([(item.future, error) for item in pending])
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
                self._resolve([(item.future, busy) for item in expired])
                pending = [item for item in pending if item.deadline > now]
                if not pending:
                    return
            if self._current_busy_ms != 0:
                # SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, far
                # longer than another process holds the lock: retry here, finely.
                connection.execute("PRAGMA busy_timeout = 0")
                self._current_busy_ms = 0
            read_only = all(item.read_only for item in pending)
            try:
                connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    # Another process holds the lock for well under a millisecond, usually:
                    # retry soon, backing off to 2 ms so a long lock does not burn a core.
                    time.sleep(self._busy_pause)
                    self._busy_pause = min(self._busy_pause * 2, _BUSY_PAUSE_MAX)
                    continue
                self._busy_pause = _BUSY_PAUSE_FIRST
                self._resolve([(item.future, _translate(exc)) for item in pending])
                return
            self._busy_pause = _BUSY_PAUSE_FIRST
            batch = Batch()
            outcomes: list[tuple[asyncio.Future[Any], Any]] = []
            try:
                for item in pending:
                    try:
                        outcomes.append((item.future, item.run(connection, batch)))
                    except WireworkError as exc:
                        outcomes.append((item.future, exc))
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                if _is_busy(exc):
                    continue
                self._resolve([(item.future, _translate(exc)) for item in pending])
                return
            self.commits += 1
            self.operations += len(pending)
            self._resolve(outcomes)
            if batch.listeners:
                self._after_commit(batch)
            return

    def _resolve(self, outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(_settle_all, outcomes)


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _translate(exc: sqlite3.Error) -> BrokerError:
    if _is_busy(exc):
        return BrokerBusyError(f"the SQLite broker file is locked: {exc}")
    return BrokerUnavailableError(f"SQLite broker failed: {exc}")
