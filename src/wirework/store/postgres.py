"""The PostgreSQL store: an asyncpg pool, one connection per open transaction.

Transactions run at PostgreSQL's default isolation (read committed), which is
what the inbox needs: a claim (``INSERT ... ON CONFLICT DO NOTHING``) of a
message another open transaction has claimed waits until that one commits
(the claim is then a duplicate) or rolls back (the claim then succeeds).

``schema`` (``?schema=name`` in the URL) puts wirework's tables, and the
user's unqualified ones, in a schema of their own through ``search_path``;
it is created if missing. Migrations take a transaction-level advisory lock
per schema, so processes starting together apply them once. Outbox rows of
one key take a transaction-level advisory lock on that key, so transactions
that publish for the same key commit one after the other, in the order of
their sequence numbers; a commit with outbox rows sends ``NOTIFY`` so relays
in other processes wake at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.faults import fault_point
from wirework.store.base import Row, Store, Transaction, activate, check_identifier, deactivate
from wirework.store.errors import (
    StoreClosedError,
    StoreConflictError,
    StoreError,
    StoreQueryError,
    StoreUnavailableError,
    TransactionError,
)
from wirework.store.schema import CREATE_VERSION_TABLE, VERSION_TABLE, pending

log = logging.getLogger("wirework.store.postgres")

#: First key of wirework's two-key advisory locks ("ww"), apart from the user's one-key locks.
_MIGRATION_LOCK = 0x7777
_KEY_LOCK = 0x7778

#: PostgreSQL error classes: 08 connection exception; 40001/40P01 serialization, deadlock.
_CONFLICT_STATES = frozenset({"40001", "40P01"})


class PostgresStoreSettings(BaseSettings):
    """Settings of ``postgresql://`` stores; also read from ``WIREWORK_STORE_PG_*``."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_STORE_PG_", extra="forbid")

    db_schema: str | None = None
    """``?schema=`` in the URL: for wirework's tables and the user's unqualified ones."""
    min_size: int = Field(default=1, ge=0)
    max_size: int = Field(default=10, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)


class PostgresStore(Store):
    """A store in a PostgreSQL database; see the module docstring for its promises."""

    dialect = "postgresql"

    def __init__(self, dsn: str, *, settings: PostgresStoreSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or PostgresStoreSettings()
        self.dsn = dsn
        self.schema = self.settings.db_schema
        if self.schema is not None:
            check_identifier("schema", self.schema)
        self.channel = f"wirework_outbox_{self.schema or 'public'}"[:63]
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Future[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._listening = asyncio.Lock()
        self._closed = False

    @property
    def _where(self) -> str:
        return f"PostgreSQL store (schema {self.schema or 'public'})"

    def _server_settings(self) -> dict[str, str]:
        return {"search_path": f'"{self.schema}"'} if self.schema else {}

    async def open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the {self._where} is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._opening)
        except StoreError:
            self._opening = None
            raise

    async def _open(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.settings.min_size,
                max_size=self.settings.max_size,
                timeout=self.settings.connect_timeout,
                server_settings=self._server_settings(),
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreUnavailableError(
                f"cannot connect to the {self._where}: {exc}; is the server up, and the URL right?"
            ) from exc
        try:
            async with pool.acquire() as connection, _translated(self._where, "migrations"):
                await self._migrate(connection)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, connection: asyncpg.Connection) -> None:
        async with connection.transaction():
            schema = self.schema or "public"
            await connection.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK, schema
            )
            if self.schema is not None:
                await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await connection.execute(CREATE_VERSION_TABLE)
            current = await connection.fetchval(f"SELECT max(version) FROM {VERSION_TABLE}")
            for migration in pending(current, where=self._where):
                for statement in migration.postgresql:
                    await connection.execute(statement)
                await connection.execute(
                    f"INSERT INTO {VERSION_TABLE} (version, applied_at) VALUES ($1, $2)",
                    migration.version,
                    time.time(),
                )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        self._enter()
        await self.open()
        pool = self._pool
        if pool is None or self._closed:
            raise StoreClosedError(f"the {self._where} is closed")
        async with _translated(self._where, "acquiring a connection"):
            connection = await pool.acquire()
        try:
            async with _translated(self._where, "BEGIN"):
                transaction = connection.transaction()
                await transaction.start()
            tx = PostgresTransaction(self, connection)
            token = activate(tx)
            try:
                try:
                    yield tx
                except BaseException:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(transaction.rollback())
                    raise
                try:
                    tx.check_committable()
                except TransactionError:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(transaction.rollback())
                    raise
                async with _translated(self._where, "COMMIT"):
                    if tx.outbox_rows:
                        await connection.execute("SELECT pg_notify($1, '')", self.channel)
                    await transaction.commit()
            finally:
                tx.closed = True
                deactivate(token)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(pool.release(connection))
        if tx.outbox_rows:
            fault_point("outbox.after_commit_before_relay")
            self.outbox_committed()

    async def now(self, tx: Transaction) -> float:
        value = await tx.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        return float(value)

    async def wait_outbox(self, generation: int, timeout: float) -> None:
        """As ``Store.wait_outbox``; also woken by commits in other processes (LISTEN)."""
        await self._listen()
        await super().wait_outbox(generation, timeout)

    async def _listen(self) -> None:
        async with self._listening:
            await self._listen_once()

    async def _listen_once(self) -> None:
        if self._closed or (self._listener is not None and not self._listener.is_closed()):
            return
        self._listener = None
        try:
            listener = await asyncpg.connect(
                self.dsn,
                timeout=self.settings.connect_timeout,
                server_settings=self._server_settings(),
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            # Relays still poll; the next wait tries again.
            log.warning("cannot LISTEN on the %s (%s); polling only", self._where, exc)
            return
        try:
            await listener.add_listener(self.channel, self._notified)
        except BaseException as exc:
            # Cancelled (a relay stopping) or refused: the connection is ours to close,
            # or it leaks until the process ends.
            await asyncio.shield(_close_quietly(listener))
            if not isinstance(exc, (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                raise
            log.warning("cannot LISTEN on the %s (%s); polling only", self._where, exc)
            return
        self._listener = listener

    def _notified(self, *_: object) -> None:
        self.outbox_committed()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opening is not None and not self._opening.done():
            with contextlib.suppress(Exception):
                await self._opening
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self._pool is not None:
            await self._pool.close()


async def _close_quietly(connection: asyncpg.Connection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


class PostgresTransaction(Transaction):
    """A transaction on one pooled connection."""

    store: PostgresStore

    def __init__(self, store: PostgresStore, connection: asyncpg.Connection) -> None:
        super().__init__(store)
        self._connection = connection

    async def execute(self, sql: str, *args: Any) -> int:
        self._check_open()
        status: str = await self._guard(self._call("execute", sql, args))
        return _rowcount(status)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        self._check_open()
        records = await self._guard(self._call("fetch", sql, args))
        return [dict(record) for record in records]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        self._check_open()
        record = await self._guard(self._call("fetchrow", sql, args))
        return None if record is None else dict(record)

    async def _call(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        async with _translated(self.store._where, sql):
            return await getattr(self._connection, method)(sql, *args)

    async def lock_key(self, key: str) -> None:
        await self.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _KEY_LOCK, key)


def _rowcount(status: str) -> int:
    """The row count at the end of a command tag: ``INSERT 0 1`` -> 1, ``CREATE TABLE`` -> 0."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


@asynccontextmanager
async def _translated(where: str, sql: str) -> AsyncIterator[None]:
    """asyncpg's errors as ours, naming the statement."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", None)
        statement = _short(sql)
        if state in _CONFLICT_STATES:
            raise StoreConflictError(
                f"the {where} aborted the transaction at {statement} ({exc}); "
                f"nothing was committed, run the transaction again"
            ) from exc
        if isinstance(state, str) and state.startswith(("08", "57P")):
            raise StoreUnavailableError(f"the {where} went away at {statement}: {exc}") from exc
        raise StoreQueryError(f"the {where} refused {statement}: {exc}", sqlstate=state) from exc
    except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise StoreUnavailableError(f"the {where} is unreachable at {_short(sql)}: {exc}") from exc


def _short(sql: str) -> str:
    flat = " ".join(sql.split())
    return repr(flat if len(flat) <= 120 else flat[:119] + "…")
