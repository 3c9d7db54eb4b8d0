"""The store contract, one suite over SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from wirework.errors import ConfigurationError
from wirework.store import (
    Store,
    StoreBusyError,
    StoreQueryError,
    StoreSchemaError,
    TransactionError,
    connect_store,
    current_transaction,
)
from wirework.store.schema import LATEST, VERSION_TABLE
from wirework.store.sqlite import SqliteStore, translate
from wirework.testing.conformance import wait_until

ITEMS = "CREATE TABLE items (id TEXT PRIMARY KEY, qty INTEGER NOT NULL, note TEXT)"


async def count(store: Store, sql: str, *args: object) -> int:
    async with store.transaction() as tx:
        return int(await tx.fetchval(sql, *args))


async def test_migrations_are_applied_once_even_by_stores_opening_together(
    store_url: str,
) -> None:
    """Four stores opening one empty database at once leave one row per schema version."""
    stores = [connect_store(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(one.open() for one in stores))
        async with stores[0].transaction() as tx:
            rows = await tx.fetch(f"SELECT version FROM {VERSION_TABLE} ORDER BY version")
        assert [row["version"] for row in rows] == list(range(1, LATEST + 1))
    finally:
        for one in stores:
            await one.aclose()
    again = connect_store(store_url)
    async with again:
        assert await count(again, f"SELECT count(*) FROM {VERSION_TABLE}") == LATEST


async def test_a_schema_newer_than_this_wirework_is_refused(store: Store, store_url: str) -> None:
    """A database migrated by a newer wirework is refused with a StoreSchemaError."""
    async with store.transaction() as tx:
        await tx.execute(
            f"INSERT INTO {VERSION_TABLE} (version, applied_at) VALUES ($1, $2)", LATEST + 1, 0.0
        )
    newer = connect_store(store_url)
    with pytest.raises(StoreSchemaError, match=f"version {LATEST + 1}"):
        await newer.open()
    await newer.aclose()


async def test_statements_use_numbered_placeholders_on_both_dialects(store: Store) -> None:
    """$1, $2 work everywhere, a placeholder may repeat, and rows come back as dicts."""
    async with store.transaction() as tx:
        await tx.execute(ITEMS)
        changed = await tx.execute(
            "INSERT INTO items (id, qty, note) VALUES ($1, $2, $3), ($4, $2, '$1 stays')",
            "a",
            3,
            "first",
            "b",
        )
        assert changed == 2
        rows = await tx.fetch("SELECT id, qty, note FROM items ORDER BY id")
        assert rows == [
            {"id": "a", "qty": 3, "note": "first"},
            {"id": "b", "qty": 3, "note": "$1 stays"},
        ]
        assert await tx.fetchrow("SELECT id FROM items WHERE qty = $1 AND id = $2", 3, "b") == {
            "id": "b"
        }
        assert await tx.fetchrow("SELECT id FROM items WHERE id = $1", "zz") is None
        assert await tx.fetchval("SELECT count(*) FROM items WHERE qty = $1", 3) == 2
        assert await tx.execute("UPDATE items SET qty = qty + $1 WHERE qty >= $1", 3) == 2


def test_translation_leaves_quoted_text_and_comments_alone() -> None:
    """Only placeholders outside strings, quoted names and comments are rewritten."""
    sql = "SELECT $1, '$2', \"$3\", $10 -- $4\n/* $5 */ FROM t WHERE a = $2"
    assert translate(sql) == "SELECT ?1, '$2', \"$3\", ?10 -- $4\n/* $5 */ FROM t WHERE a = ?2"


async def test_commit_keeps_and_an_error_rolls_back(store: Store) -> None:
    """A block that ends commits; a block that raises leaves nothing behind."""
    async with store.transaction() as tx:
        await tx.execute(ITEMS)
        await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "kept", 1)

    async def failing() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "gone", 1)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing()
    async with store.transaction() as tx:
        assert await tx.fetch("SELECT id FROM items") == [{"id": "kept"}]


async def test_a_cancelled_transaction_rolls_back(store: Store) -> None:
    """Cancelling the task inside a transaction rolls it back, and the store stays usable."""
    async with store.transaction() as tx:
        await tx.execute(ITEMS)
    inside = asyncio.Event()

    async def writer() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "x", 1)
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(writer())
    await asyncio.wait_for(inside.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await count(store, "SELECT count(*) FROM items") == 0


async def test_a_transaction_inside_another_of_the_same_store_is_refused(store: Store) -> None:
    """Nesting would wait for itself on SQLite: it raises at once, naming what to use."""
    async with store.transaction() as outer:
        assert current_transaction() is outer
        with pytest.raises(TransactionError, match="current_transaction"):
            async with store.transaction():
                pass
    with pytest.raises(TransactionError, match="no store transaction"):
        current_transaction()
    with pytest.raises(TransactionError, match="over"):
        await outer.execute("SELECT 1")


async def test_upsert_inserts_then_updates(store: Store) -> None:
    """upsert writes a row once per key, later values winning."""
    async with store.transaction() as tx:
        await tx.execute(ITEMS)
        await tx.upsert("items", ["id"], {"id": "a", "qty": 1, "note": "one"})
        await tx.upsert("items", ["id"], {"id": "a", "qty": 5, "note": "five"})
        await tx.upsert("items", ["id"], {"id": "b", "qty": 2})
        rows = await tx.fetch("SELECT id, qty, note FROM items ORDER BY id")
    assert rows == [{"id": "a", "qty": 5, "note": "five"}, {"id": "b", "qty": 2, "note": None}]


async def test_upsert_checks_names(store: Store) -> None:
    """Names that are not plain identifiers never reach SQL."""
    async with store.transaction() as tx:
        with pytest.raises(ConfigurationError, match="table name"):
            await tx.upsert('items"; DROP TABLE x; --', ["id"], {"id": "a"})
        with pytest.raises(ConfigurationError, match="key column"):
            await tx.upsert("items", ["id"], {"qty": 1})


async def test_the_database_refusing_a_statement_is_a_store_query_error(store: Store) -> None:
    """Bad SQL and a broken constraint raise StoreQueryError naming the statement."""
    with pytest.raises(StoreQueryError, match="SELEC"):
        async with store.transaction() as tx:
            await tx.execute("SELEC 1")
    async with store.transaction() as tx:
        await tx.execute(ITEMS)
        await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "a", 1)
    with pytest.raises(StoreQueryError, match="INSERT INTO items"):
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "a", 2)
    assert await count(store, "SELECT qty FROM items WHERE id = $1", "a") == 1


async def test_a_claim_is_made_once_and_undone_by_a_rollback(store: Store) -> None:
    """The inbox claim: True the first time, False after it committed, True again after a
    rollback; per group."""

    async def failing() -> None:
        async with store.transaction() as tx:
            assert await tx.claim("g", "m1")
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await failing()
    async with store.transaction() as tx:
        assert await tx.claim("g", "m1")
    async with store.transaction() as tx:
        assert not await tx.claim("g", "m1")
        assert await tx.claim("other", "m1")


@pytest.mark.parametrize("outcome", ["rollback", "commit"])
async def test_a_second_claim_waits_for_the_first_transaction(store: Store, outcome: str) -> None:
    """Concurrent claims of one message: the second waits; it wins only if the first rolls back."""
    first_claimed = asyncio.Event()
    finish = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            assert await tx.claim("g", "m")
            first_claimed.set()
            await finish.wait()
            if outcome == "rollback":
                raise RuntimeError("rolled back")

    async def second() -> bool:
        async with store.transaction() as tx:
            return await tx.claim("g", "m")

    one = asyncio.create_task(first())
    await asyncio.wait_for(first_claimed.wait(), 10)
    two = asyncio.create_task(second())
    await wait_until(lambda: waiting(store, two), 10, what="the second claim to wait")
    assert not two.done()
    finish.set()
    if outcome == "rollback":
        with pytest.raises(RuntimeError):
            await one
    else:
        await one
    assert await asyncio.wait_for(two, 10) is (outcome == "rollback")


async def waiting(store: Store, task: asyncio.Task[bool]) -> bool:
    """Whether ``task`` is blocked: on the lock of a PostgreSQL row, or SQLite's store lock."""
    if task.done():
        return True  # let the caller's assertion say it did not wait
    if store.dialect == "sqlite":
        return True  # transactions of one SQLite store never overlap: it waits by design
    async with store.transaction() as tx:
        blocked = await tx.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%wirework_inbox%'"
        )
    return bool(blocked)


async def test_a_locked_sqlite_file_gives_a_busy_error_then_works(tmp_path: Path) -> None:
    """Another process's write lock past busy_timeout: StoreBusyError, then the store works."""
    path = tmp_path / "store.db"
    store = connect_store(f"sqlite:///{path}", busy_timeout=0.3)
    async with store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        started = asyncio.get_running_loop().time()
        with pytest.raises(StoreBusyError, match=r"busy_timeout=0\.3"):
            async with store.transaction() as tx:
                await tx.execute("SELECT 1")
        assert asyncio.get_running_loop().time() - started < 0.3 + 2.0
        other.execute("COMMIT")
        other.close()
        async with store.transaction() as tx:
            assert await tx.claim("g", "after-lock")


async def test_a_transaction_cancelled_while_beginning_leaves_no_lock_behind(
    tmp_path: Path,
) -> None:
    """Cancelled while BEGIN IMMEDIATE waits on the file: it is rolled back once it begins,
    so the store and other processes can write afterwards (the saga crash runs found it)."""
    path = tmp_path / "store.db"
    store = connect_store(f"sqlite:///{path}", busy_timeout=10)
    async with store:
        async with store.transaction() as tx:
            await tx.execute("CREATE TABLE t (n INTEGER)")
        other = sqlite3.connect(path, isolation_level=None, timeout=10)
        other.execute("BEGIN EXCLUSIVE")

        async def write() -> None:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")

        task = asyncio.create_task(write())
        lock = store._lock if isinstance(store, SqliteStore) else None
        await wait_until(lambda: lock is not None and lock.locked(), 10, what="BEGIN")
        task.cancel()
        other.execute("COMMIT")  # BEGIN on the store's thread now goes through, then is undone
        with pytest.raises(asyncio.CancelledError):
            await task
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (2)")
        other.execute("INSERT INTO t VALUES (3)")  # autocommit: needs the write lock
        other.close()
        async with store.transaction() as tx:
            assert await tx.fetch("SELECT n FROM t ORDER BY n") == [{"n": 2}, {"n": 3}]


def test_store_urls_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A wrong URL or option names what to write instead; WIREWORK_STORE is the default."""
    with pytest.raises(ConfigurationError, match="unknown store scheme"):
        connect_store("mysql://localhost/db")
    with pytest.raises(ConfigurationError, match="did you mean 'busy_timeout'"):
        connect_store("sqlite:///x.db?busy_timeut=1")
    with pytest.raises(ConfigurationError, match=r"postgresql://u:\*\*\*@h/db"):
        connect_store("postgresql://u:secret@h/db", nope=1)
    with pytest.raises(ConfigurationError, match=r"'max_size'='0' .*postgresql://u:\*\*\*@h/db"):
        connect_store("postgresql://u:secret@h/db?max_size=0")
    kept = connect_store("postgresql://u@h/db?schema=s1&sslmode=disable&min_size=2")
    assert getattr(kept, "dsn", None) == "postgresql://u@h/db?sslmode=disable"
    assert getattr(kept, "schema", None) == "s1"
    monkeypatch.delenv("WIREWORK_STORE", raising=False)
    with pytest.raises(ConfigurationError, match="WIREWORK_STORE"):
        connect_store()
    monkeypatch.setenv("WIREWORK_STORE", f"sqlite:///{tmp_path}/env.db")
    assert connect_store().dialect == "sqlite"


@pytest.mark.parametrize(("durability", "synchronous"), [("strict", 2), ("fast", 1)])
async def test_sqlite_durability_sets_how_commits_reach_the_disk(
    tmp_path: Path, durability: str, synchronous: int
) -> None:
    """strict: synchronous=FULL (2), the default; fast: NORMAL (1); anything else refused."""
    store = connect_store(f"sqlite:///{tmp_path}/d.db?durability={durability}")
    async with store, store.transaction() as tx:
        assert await tx.fetchval("PRAGMA synchronous") == synchronous
    with pytest.raises(ConfigurationError, match="durability"):
        connect_store(f"sqlite:///{tmp_path}/d.db?durability=lazy")


async def test_a_caught_statement_error_still_prevents_the_commit(store: Store) -> None:
    """A statement error caught inside the block spoils the transaction on both dialects: the
    block's end raises TransactionError and nothing of it is committed (PostgreSQL would roll
    back silently at COMMIT)."""
    async with store.transaction() as tx:
        await tx.execute(ITEMS)

    async def swallowing() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "a", 1)
            with contextlib.suppress(StoreQueryError):
                await tx.execute("INSERT INTO items (id, qty) VALUES ($1, $2)", "a", 2)

    with pytest.raises(TransactionError, match="rolled back"):
        await swallowing()
    assert await count(store, "SELECT count(*) FROM items") == 0


def test_importing_the_store_loads_no_database_client() -> None:
    """`import wirework.store` loads neither asyncpg nor a backend module."""
    code = (
        "import sys, wirework.store\n"
        "names = ('asyncpg', 'wirework.store.sqlite', 'wirework.store.postgres')\n"
        "print(','.join(m for m in names if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
