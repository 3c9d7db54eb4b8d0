"""The store contract: transactions that carry the user's SQL and wirework's own records.

A ``Store`` holds the durable state several patterns share (the inbox, the
outbox, and later HTTP idempotency keys and sagas), so that a handler's
business write, its inbox claim and the events it publishes commit together
or not at all. Two backends implement it: SQLite (the embedded default) and
PostgreSQL; one test suite (``tests/store``) runs over both.

SQL is written once with PostgreSQL's numbered placeholders, ``$1``, ``$2``
...; the SQLite backend rewrites them to SQLite's own ``?1``, ``?2`` (which
also lets one value be used twice). Rows come back as plain ``dict``\\ s.
Dialect differences in DDL and types are the user's to handle
(``tx.dialect`` says which one runs); ``upsert`` writes the one statement
both understand.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from wirework.errors import ConfigurationError
from wirework.store.errors import StoreError, TransactionError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from wirework.envelope import Envelope

T = TypeVar("T")

Dialect = Literal["sqlite", "postgresql"]

Row = dict[str, Any]
"""One result row, column name to value."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_current: ContextVar[Transaction | None] = ContextVar("wirework_transaction", default=None)


def current_transaction() -> Transaction:
    """The store transaction the running code is inside (a handler under the inbox).

    Raises:
        TransactionError: no transaction is open in this task.
    """
    tx = _current.get()
    if tx is None or tx.closed:
        raise TransactionError(
            "no store transaction is open here: use `async with store.transaction() as tx`, "
            "or mark the handler idempotent=True so the inbox opens one"
        )
    return tx


def activate(tx: Transaction) -> Token[Transaction | None]:
    """Make ``tx`` the current transaction of this task (for the backends)."""
    return _current.set(tx)


def deactivate(token: Token[Transaction | None]) -> None:
    _current.reset(token)


def check_identifier(kind: str, name: str) -> str:
    """A table or column name, checked, so it can be written into SQL quoted."""
    if not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use a letter or _ then letters, digits or _, "
            f"at most 63 characters"
        )
    return name


class Transaction(ABC):
    """One open database transaction; valid only inside its ``async with`` block.

    Commits when the block ends normally and rolls back when it raises. The
    user's statements and wirework's own records (inbox claims, outbox rows)
    share it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.closed = False
        self.outbox_rows = 0
        """Outbox rows written; a commit with any wakes the relays."""
        self.default_source: str | None = None
        """The ``source`` of events ``publish`` wraps from a bare body (a service sets it)."""
        self.stamp: Callable[[str, Envelope], Envelope] | None = None
        """Applied to each event ``publish`` writes, with its topic: a service's tracing
        puts the writer's trace context in it here, so the event's consumers join the
        writer's trace although the relay publishes it later, from no context."""
        self.failed: StoreError | None = None
        """The first statement error: it spoils the transaction, which then cannot commit."""

    @property
    def dialect(self) -> Dialect:
        return self.store.dialect

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns the number of rows it changed (0 for DDL).

        Raises:
            StoreQueryError: the database refused the statement.
            StoreConflictError: the database aborted the transaction; run it again.
            TransactionError: the transaction is over.
        """

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query; every row as a ``dict``. Raises as ``execute``."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row of a query, or None. Raises as ``execute``."""
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None. Raises as ``execute``."""
        row = await self.fetchrow(sql, *args)
        return None if row is None else next(iter(row.values()), None)

    async def upsert(
        self, table: str, key_columns: Sequence[str], values: Mapping[str, Any]
    ) -> int:
        """Insert a row, or update the row with the same key: ``INSERT ... ON CONFLICT``.

        ``key_columns`` must be the columns of a primary key or unique
        constraint of ``table``; the other columns in ``values`` are
        overwritten on a conflict. Returns the rows changed (1).

        Raises:
            ConfigurationError: a name is not a plain identifier, or a key
                column has no value.
            StoreQueryError: no unique constraint covers ``key_columns``.
        """
        check_identifier("table", table)
        columns = [check_identifier("column", name) for name in values]
        missing = [name for name in key_columns if name not in values]
        if missing or not key_columns:
            raise ConfigurationError(
                f"upsert into {table!r} needs a value for every key column; missing {missing}"
            )
        for name in key_columns:
            check_identifier("column", name)
        quoted = ", ".join(f'"{name}"' for name in columns)
        marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
        keys = ", ".join(f'"{name}"' for name in key_columns)
        updates = [f'"{name}" = excluded."{name}"' for name in columns if name not in key_columns]
        action = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
        sql = f'INSERT INTO "{table}" ({quoted}) VALUES ({marks}) ON CONFLICT ({keys}) {action}'
        return await self.execute(sql, *values.values())

    async def claim(self, group: str, message_id: str) -> bool:
        """Record that ``group`` handles ``message_id``; False if it was recorded before.

        On PostgreSQL, a claim of the same message by another transaction not
        yet finished makes this wait until it commits (False) or rolls back
        (True). On SQLite, write transactions never overlap.
        """
        changed = await self.execute(
            "INSERT INTO wirework_inbox (consumer_group, message_id, handled_at) "
            "VALUES ($1, $2, $3) ON CONFLICT (consumer_group, message_id) DO NOTHING",
            group,
            message_id,
            await self.store.now(self),
        )
        return changed == 1

    async def publish(
        self,
        topic: str,
        event: Envelope | BaseModel,
        *,
        key: str | None = None,
        type: str | None = None,
        source: str | None = None,
    ) -> Envelope:
        """Write ``event`` to the outbox in this transaction; the relay publishes it after commit.

        See ``wirework.store.outbox.write`` for the arguments.
        """
        from wirework.store.outbox import write  # outbox builds on this module

        return await write(self, topic, event, key=key, type=type, source=source)

    async def lock_key(self, key: str) -> None:
        """Hold ``key`` until this transaction ends, so events of one key commit in order.

        SQLite's write transactions never overlap, so there it does nothing.
        """
        self._check_open()

    async def _guard(self, call: Awaitable[T]) -> T:
        """Await a statement; an error from it spoils the transaction (as on PostgreSQL).

        PostgreSQL refuses every later statement of a transaction in which one
        failed, and its COMMIT then rolls back without an error; SQLite would go
        on. Both backends refuse to commit such a transaction instead, so a
        caught error can never make the inbox ack a message whose claim and
        effects were silently rolled back.
        """
        try:
            return await call
        except StoreError as exc:
            if self.failed is None:
                self.failed = exc
            raise

    def check_committable(self) -> None:
        """Raise if a statement failed: the block must end by raising, not by committing."""
        if self.failed is not None:
            raise TransactionError(
                f"a statement of this transaction failed ({self.failed}); the transaction was "
                f"rolled back: let the error end the `async with` block, or avoid it with "
                f"ON CONFLICT / upsert"
            ) from self.failed

    def _check_open(self) -> None:
        if self.closed:
            raise TransactionError(
                "this transaction is over: use tx only inside its `async with` block"
            )


class Store(ABC):
    """A database for wirework's records and the user's; open with ``connect_store(url)``.

    Nothing is contacted until first use (or ``open()``), which applies the
    schema migrations. ``async with store:`` closes it at the end.
    """

    dialect: Dialect

    def __init__(self) -> None:
        self._outbox_generation = 0
        self._outbox_waiters: set[Any] = set()

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date; later calls do nothing.

        Raises:
            StoreUnavailableError, StoreBusyError: try again later.
            StoreSchemaError: the database's schema is newer than this wirework.
        """

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """``async with store.transaction() as tx:``: commit at the end, roll back on an error.

        Raises:
            TransactionError: a transaction of this store is already open in this task.
            StoreBusyError, StoreUnavailableError, StoreConflictError: nothing was committed.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections; safe to call twice."""

    @abstractmethod
    async def now(self, tx: Transaction) -> float:
        """Wall-clock seconds since the epoch as the store sees them (the server's, on PG)."""

    @property
    def outbox_generation(self) -> int:
        """Raised by every commit that wrote outbox rows (here or, where told, elsewhere)."""
        return self._outbox_generation

    async def wait_outbox(self, generation: int, timeout: float) -> None:
        """Return once ``outbox_generation`` differs from ``generation``, or after ``timeout``."""
        if self._outbox_generation != generation or timeout <= 0:
            return
        event = asyncio.Event()
        self._outbox_waiters.add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return
        finally:
            self._outbox_waiters.discard(event)

    def outbox_committed(self) -> None:
        """Wake the relays waiting in ``wait_outbox``: outbox rows were committed."""
        self._outbox_generation += 1
        for event in self._outbox_waiters:
            event.set()

    def _enter(self) -> None:
        """Refuse a transaction inside another of this store, which would wait for itself."""
        outer = _current.get()
        if outer is not None and not outer.closed and outer.store is self:
            raise TransactionError(
                "a transaction of this store is already open in this task; use it "
                "(wirework.store.current_transaction()) instead of opening another"
            )

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
