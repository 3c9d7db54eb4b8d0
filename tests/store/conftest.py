"""The stores the suite runs on, each built lazily by its own parameter.

SQLite gets a fresh file per test; PostgreSQL (127.0.0.1:5432, database
``test``) a fresh schema per test, dropped afterwards, so parallel runs
never share state. A PostgreSQL that does not answer skips its parameters
locally and fails them under ``WIREWORK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import pytest

from tests.helpers.services import require_service
from wirework.store import Store, connect_store

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.ext))


async def drop_schema(schema: str) -> None:
    connection = await asyncpg.connect(PG_DSN)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of one backend (a PostgreSQL schema is dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"ww_store_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_DSN}?schema={schema}"
    finally:
        await drop_schema(schema)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store of one backend, closed after the test."""
    opened = connect_store(store_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()
