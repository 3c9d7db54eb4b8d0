"""The stores the saga tests run on: a fresh SQLite file, or a fresh PostgreSQL schema."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.services import require_service
from tests.store.conftest import PG_DSN, drop_schema
from wirework.store import Store, connect_store

BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.ext))


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of one backend (a PostgreSQL schema is dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"ww_saga_{uuid.uuid4().hex[:12]}"
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
