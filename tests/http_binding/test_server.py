"""HttpServer: a free port, graceful stop with a request in flight, clear errors."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.http_binding.catalog import faulty
from wirework.errors import ConfigurationError
from wirework.http import http_app
from wirework.http.server import HttpServer
from wirework.testing.conformance import wait_until


async def test_port_zero_picks_a_free_port_and_stop_releases_it() -> None:
    server = HttpServer(http_app(faulty), "127.0.0.1", 0)
    with pytest.raises(ConfigurationError, match="start"):
        _ = server.port
    await server.start()
    try:
        assert server.port > 0
        with pytest.raises(ConfigurationError, match="already running"):
            await server.start()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/healthz") as answer,
        ):
            assert answer.status == 200
    finally:
        await server.stop()
    again = HttpServer(http_app(faulty), "127.0.0.1", server.port)
    async with again:
        assert again.port == server.port


async def test_a_port_in_use_is_a_configuration_error_naming_it() -> None:
    async with HttpServer(http_app(faulty)) as first:
        taken = HttpServer(http_app(faulty), "127.0.0.1", first.port)
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{first.port}"):
            await taken.start()


async def test_stop_lets_a_request_in_flight_finish() -> None:
    server = HttpServer(http_app(faulty), grace=5.0)
    await server.start()
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            session.get(f"{server.url}/v1/slow", params={"seconds": "0.5"})
        )
        await wait_until(lambda: server.in_flight() > 0, timeout=5.0, what="the request to start")
        await server.stop()
        answer = await request
        assert answer.status == 200
        assert await answer.json() == {"text": "done"}
        answer.release()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{server.port}/healthz")
