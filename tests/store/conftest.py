"""The stores the suite runs on, each built lazily by its own parameter.

SQLite gets a fresh file per test; PostgreSQL (127.0.0.1:5432, database
``test``) a fresh schema per test, dropped afterwards, so parallel runs
never share state. A PostgreSQL that does not answer skips its parameters
locally and fails them under ``WIREWORK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.stores import BACKENDS, empty_store_url, opened_store
from wirework.store import Store


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of one backend (a PostgreSQL schema is dropped afterwards)."""
    async with empty_store_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store of one backend, closed after the test."""
    async with opened_store(store_url) as opened:
        yield opened
