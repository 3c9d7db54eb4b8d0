"""Fixtures: the catalog service on a real uvicorn server, and a client through the registry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.http_binding.catalog import Stock, catalog, faulty
from wirework.http import HttpLimits, http_app
from wirework.http.client import HttpClient
from wirework.http.server import HttpServer
from wirework.registry import Registry


@pytest.fixture
def limits() -> HttpLimits:
    """The default limits, but a 1 s header-read timeout so a slowloris test is quick."""
    return HttpLimits(header_read_timeout=1.0)


@pytest.fixture
async def server(limits: HttpLimits) -> AsyncIterator[HttpServer]:
    """``catalog`` and ``faulty`` served on a free port, with a fresh stock."""
    saved = catalog.overrides()
    catalog.override(Stock, Stock())
    try:
        async with HttpServer(http_app(catalog, faulty, limits=limits), "127.0.0.1", 0) as running:
            yield running
    finally:
        catalog.reset_overrides(saved)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session, for looking at the wire itself."""
    async with aiohttp.ClientSession() as plain:
        yield plain


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[HttpClient]:
    """A typed client for catalog, finding the server through the registry."""
    registry = Registry({"catalog": [server.url]})
    async with HttpClient("catalog", catalog, registry=registry, timeout=5.0) as typed:
        yield typed
