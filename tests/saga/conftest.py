"""The stores the saga tests run on: a fresh SQLite file, or a fresh PostgreSQL schema."""

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
