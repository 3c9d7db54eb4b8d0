"""The stores a test runs on: a fresh SQLite file, or a fresh PostgreSQL schema dropped after.

Every suite that runs on both stores (``tests/store``, ``tests/saga``, the
HTTP Idempotency-Key tests) takes its ``store_url`` and ``store`` fixtures
from here, so "a fresh store per test" means one thing. A PostgreSQL that
does not answer skips its parameter locally and fails it under
``WIREWORK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import pytest

from tests.helpers.services import require_service
from wirework.store import Store, connect_store

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.ext))
"""The ``params`` of a fixture that gives one store of each backend."""


async def drop_schema(schema: str) -> None:
    connection = await asyncpg.connect(PG_DSN)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def empty_store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of ``backend`` ("sqlite" or "postgresql")."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"ww_test_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_DSN}?schema={schema}"
    finally:
        await drop_schema(schema)


@contextlib.asynccontextmanager
async def opened_store(url: str) -> AsyncIterator[Store]:
    """The store at ``url``, open (migrations applied), closed afterwards."""
    store = connect_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
