"""The embedded store: one SQLite file, driven from a thread of its own.

Durable: WAL mode with ``synchronous=FULL``, so a committed transaction
survives a process crash and a power loss (``?durability=fast``:
``synchronous=NORMAL``, a process crash loses nothing, a power loss may lose
the last commits). Every statement runs on one
dedicated thread (the event loop never waits on disk), and transactions of
one store never overlap in a process: each begins with ``BEGIN IMMEDIATE``,
which takes the file's write lock at once, so they never overlap across
processes either. That serial order is what the inbox and the outbox rely on
(a claim never races another claim; outbox sequence numbers are commit order).

Another process holding the write lock makes ``BEGIN IMMEDIATE`` wait up to
``busy_timeout`` seconds, then fail with ``StoreBusyError``; nothing hangs,
and nothing half-happens. Placeholders are written ``$1``, ``$2`` as on
PostgreSQL and rewritten to SQLite's ``?1``, ``?2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.errors import ConfigurationError
from wirework.faults import fault_point
from wirework.sqlite_wal import use_wal
from wirework.store.base import Row, Store, Transaction, activate, deactivate
from wirework.store.errors import (
    StoreBusyError,
    StoreClosedError,
    StoreError,
    StoreQueryError,
    StoreSchemaError,
    StoreUnavailableError,
)
from wirework.store.schema import CREATE_VERSION_TABLE, VERSION_TABLE, pending

T = TypeVar("T")

# A quoted string, a quoted name, a comment, or a placeholder ($1 ...) to rewrite.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|\$(\d+)", re.S)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """``$1`` -> ``?1`` outside quotes and comments: PostgreSQL's placeholders for SQLite."""
    return _TOKENS.sub(lambda m: f"?{m.group(1)}" if m.group(1) else m.group(0), sql)


class SqliteStoreSettings(BaseSettings):
    """Settings of ``sqlite:///...`` stores; also read from ``WIREWORK_STORE_SQLITE_*``."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_STORE_SQLITE_", extra="forbid")

    busy_timeout: float = Field(default=5.0, gt=0)
    """Seconds a transaction waits for another process's write lock before StoreBusyError."""
    durability: Literal["strict", "fast"] = "strict"
    """``strict``: ``synchronous=FULL``, a commit survives a power loss. ``fast``:
    ``synchronous=NORMAL``, a commit survives the process's crash but the last ones
    may be lost to a power loss or an OS crash (the SQLite broker's ``fast`` alike)."""


class SqliteStore(Store):
    """A store in one SQLite file; see the module docstring for its promises."""

    dialect = "sqlite"

    def __init__(
        self, path: str | os.PathLike[str], *, settings: SqliteStoreSettings | None = None
    ) -> None:
        super().__init__()
        self.settings = settings or SqliteStoreSettings()
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigurationError(
                f"the directory for the SQLite store file {str(self.path)!r} does not exist; "
                f"create {str(self.path.parent)!r} first or point the URL elsewhere"
            )
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closed = False

    # -- the thread ----------------------------------------------------------------

    def _run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="wirework-store")
        return asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run on the thread; a cancelled caller still waits for it, so order is kept."""
        return await _finish(self._run(function, *args))

    # -- opening ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the SQLite store on {str(self.path)!r} is closed")
        if self._opening is None:
            self._lock = asyncio.Lock()
            self._opening = asyncio.ensure_future(self._call(self._open_sync))
        try:
            await asyncio.shield(self._opening)
        except StoreError:
            self._opening = None  # a later call tries again
            raise

    def _open_sync(self) -> None:
        if self._connection is not None:
            return
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        try:
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"cannot open the SQLite store {str(self.path)!r}: {exc}"
            ) from exc
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout * 1000)}")
            use_wal(connection, self.settings.busy_timeout)
            synchronous = "FULL" if self.settings.durability == "strict" else "NORMAL"
            connection.execute(f"PRAGMA synchronous = {synchronous}")
            connection.execute("PRAGMA foreign_keys = ON")
            self._migrate(connection)
        except sqlite3.Error as exc:
            connection.close()
            raise self._translate(exc, "opening") from exc
        except StoreError:
            connection.close()
            raise
        self._connection = connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(CREATE_VERSION_TABLE)
            (current,) = connection.execute(f"SELECT max(version) FROM {VERSION_TABLE}").fetchone()
            for migration in pending(current, where=str(self.path)):
                for statement in migration.sqlite:
                    connection.execute(statement)
                connection.execute(
                    f"INSERT INTO {VERSION_TABLE} (version, applied_at) VALUES (?, ?)",
                    (migration.version, time.time()),
                )
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise

    # -- transactions ----------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        self._enter()
        await self.open()
        assert self._lock is not None  # set by open()
        async with self._lock:
            if self._closed:
                raise StoreClosedError(f"the SQLite store on {str(self.path)!r} is closed")
            try:
                await self._call(self._statement, "BEGIN IMMEDIATE", ())
            except BaseException:
                # Cancelled while BEGIN ran on the thread: it may have begun, and an open
                # transaction would hold the file's write lock for good.
                await asyncio.shield(self._call(self._rollback))
                raise
            tx = SqliteTransaction(self)
            token = activate(tx)
            try:
                try:
                    yield tx
                except BaseException:
                    await self._call(self._rollback)
                    raise
                try:
                    tx.check_committable()
                    await self._call(self._statement, "COMMIT", ())
                except BaseException:
                    await self._call(self._rollback)
                    raise
            finally:
                tx.closed = True
                deactivate(token)
        if tx.outbox_rows:
            fault_point("outbox.after_commit_before_relay")
            self.outbox_committed()

    def _rollback(self) -> None:
        if self._connection is not None and self._connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._connection.execute("ROLLBACK")

    def _statement(self, sql: str, args: tuple[Any, ...]) -> int:
        connection = self._connection
        if connection is None:
            raise StoreClosedError(f"the SQLite store on {str(self.path)!r} is closed")
        try:
            cursor = connection.execute(sql, args)
        except sqlite3.Error as exc:
            raise self._translate(exc, sql) from exc
        return max(cursor.rowcount, 0)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        connection = self._connection
        if connection is None:
            raise StoreClosedError(f"the SQLite store on {str(self.path)!r} is closed")
        try:
            cursor = connection.execute(sql, args)
            names = [column[0] for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except sqlite3.Error as exc:
            raise self._translate(exc, sql) from exc

    def _translate(self, exc: sqlite3.Error, sql: str) -> StoreError:
        text = str(exc)
        if "locked" in text.lower() or "busy" in text.lower():
            return StoreBusyError(
                f"the SQLite store file {str(self.path)!r} is locked by another process for "
                f"more than busy_timeout={self.settings.busy_timeout}s; nothing was committed, "
                f"retry later"
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.OperationalError | sqlite3.IntegrityError | sqlite3.ProgrammingError
        ):
            return StoreSchemaError(
                f"{str(self.path)!r} is not a usable SQLite store file ({text}); point the "
                f"URL at a new file or at one wirework created"
            )
        return StoreQueryError(f"SQLite store {str(self.path)!r} refused {_short(sql)}: {text}")

    async def now(self, tx: Transaction) -> float:
        return time.time()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lock is not None:
            async with self._lock:  # let a running transaction end first
                pass
        if self._executor is not None:
            await self._call(self._close_sync)
            self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None


class SqliteTransaction(Transaction):
    """A transaction on the store's one connection, statements run on its thread."""

    store: SqliteStore

    async def execute(self, sql: str, *args: Any) -> int:
        self._check_open()
        return await self._guard(self.store._call(self.store._statement, translate(sql), args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        self._check_open()
        return await self._guard(self.store._call(self.store._query, translate(sql), args))


async def _finish(future: Awaitable[T]) -> T:
    """Await ``future`` to its end even if the caller is cancelled meanwhile, then re-raise."""
    task = asyncio.ensure_future(future)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _short(sql: str) -> str:
    flat = " ".join(sql.split())
    return repr(flat if len(flat) <= 120 else flat[:119] + "…")
