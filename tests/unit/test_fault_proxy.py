"""The TCP fault proxy the fault tests put in front of real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.helpers.fault_proxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        began = time.monotonic()
        writer.write(payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        return answer, time.monotonic() - began
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_proxy_forwards_delays_cuts_and_blackholes() -> None:
    """The proxy forwards both ways, adds latency, resets open connections and swallows traffic."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", upstream_port) as proxy:
            answer, _ = await _round_trip(proxy.port, b"hello")
            assert answer == b"hello"

            proxy.latency = 0.1
            answer, took = await _round_trip(proxy.port, b"slow")
            assert answer == b"slow"
            assert took >= 0.2  # 0.1 s on the way there and 0.1 s on the way back
            proxy.latency = 0.0

            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
            assert proxy.cut() == 2  # the client side and the upstream side
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(1), 5) == b""
            writer.close()
            answer, _ = await _round_trip(proxy.port, b"again")
            assert answer == b"again"

            proxy.blackhole = True
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"into the void")
            await writer.drain()
            read = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait({read}, timeout=0.3)
            read.cancel()
            assert not done, "a blackholed connection answered"
            writer.close()
            proxy.blackhole = False
            answer, _ = await _round_trip(proxy.port, b"back")
            assert answer == b"back"
    finally:
        server.close()
        await server.wait_closed()
