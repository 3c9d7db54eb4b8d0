"""The stores and brokers the suite runs on, each built lazily by its own parameter.

SQLite gets a fresh file per test; PostgreSQL (127.0.0.1:5432, database
``test``) a fresh schema per test, dropped afterwards, so parallel runs
never share state. A PostgreSQL that does not answer skips its parameters
locally and fails them under ``WIREWORK_REQUIRE_SERVICES=1``.

``broker_url`` has no parameters of its own: a test names its brokers with
``parametrize("broker_url", on(...), indirect=True)`` (``tests/store/brokers.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.stores import BACKENDS, empty_store_url, opened_store
from tests.store.brokers import empty_broker_url
from tests.store.workers import StoreRun
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


@pytest.fixture
async def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty broker of the backend the test's parameter names (a server
    namespace is purged afterwards)."""
    async with empty_broker_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def run(tmp_path: Path, store_url: str, broker_url: str) -> AsyncIterator[StoreRun]:
    """Worker processes killed and reaped at the end, even when the test fails."""
    store_run = StoreRun(tmp_path, store_url, broker_url)
    try:
        yield store_run
    finally:
        store_run.kill_all()
