"""DEV-25: abusive HTTP inputs get their status over a raw socket, and the server stays healthy.

Each input is written byte for byte on a real socket to the real server, so
what is tested is what uvicorn, our protocol layer and the app do together.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from tests.http_binding.catalog import catalog
from wirework.http import HttpLimits, http_app
from wirework.http.limits import json_depth_exceeds
from wirework.http.server import HttpServer

MiB = 1 << 20
ITEM = b'{"name":"lamp","price":1}'


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def error_type(self) -> str:
        problem = orjson.loads(self.body)
        assert self.headers["content-type"] == "application/problem+json"
        error_type: str = problem["error_type"]
        return error_type


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def send_raw(port: int, head: bytes, body: bytes = b"", *, chunk: int = 0) -> Answer:
    """Write ``head`` then ``body`` (in chunks of ``chunk`` bytes, if set); read the answer.

    The server may answer and close before the body is all written (that is
    the point of a 413), so writing stops quietly when the peer has gone.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def write() -> None:
            try:
                writer.write(head)
                step = chunk or len(body) or 1
                for start in range(0, len(body), step):
                    writer.write(body[start : start + step])
                    await writer.drain()
                await writer.drain()
            except ConnectionError:
                pass

        writing = asyncio.create_task(write())
        try:
            return await asyncio.wait_for(read_answer(reader), timeout=10)
        finally:
            writing.cancel()
    finally:
        writer.close()


def post(path: str, *headers: str, length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(data: bytes, size: int) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def inflating_to(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes: a few KiB per MiB (a decompression bomb)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MiB)
    out = [packer.compress(block) for _ in range(size // MiB)]
    return b"".join(out) + packer.flush()


# -- each input and its status ----------------------------------------------------------


async def test_a_declared_oversized_body_is_413_before_any_of_it_is_sent(
    server: HttpServer,
) -> None:
    answer = await send_raw(server.port, post("/v1/items", length=MiB + 1))
    assert answer.status == 413
    assert answer.error_type == "wirework.http.errors.PayloadTooLargeError"
    assert answer.headers["connection"] == "close"


async def test_a_chunked_oversized_body_is_413_when_the_count_passes_the_limit(
    server: HttpServer,
) -> None:
    body = b'{"name":"' + b"a" * (MiB + 1) + b'","price":1}'
    answer = await send_raw(
        server.port,
        post("/v1/items", "Transfer-Encoding: chunked"),
        chunked(body, 64 * 1024),
        chunk=64 * 1024,
    )
    assert answer.status == 413
    assert answer.error_type == "wirework.http.errors.PayloadTooLargeError"


async def test_a_10_mb_string_field_is_413(server: HttpServer) -> None:
    body = b'{"name":"' + b"x" * 10_000_000 + b'","price":1}'
    answer = await send_raw(server.port, post("/v1/items", length=len(body)), body[:65536])
    assert answer.status == 413


async def test_64_kib_of_headers_is_431(server: HttpServer) -> None:
    head = post("/v1/items", "X-Padding: " + "p" * 64 * 1024, length=len(ITEM))
    answer = await send_raw(server.port, head, ITEM)
    assert answer.status == 431
    assert answer.error_type == "wirework.http.errors.HeadersTooLargeError"


async def test_200_headers_is_431(server: HttpServer) -> None:
    many = [f"X-H{n}: {n}" for n in range(200)]
    answer = await send_raw(server.port, post("/v1/items", *many, length=len(ITEM)), ITEM)
    assert answer.status == 431


async def test_the_asgi_layer_refuses_headers_too_when_the_protocol_allows_them() -> None:
    """Under another server (here: our protocol with generous limits), the app still says 431."""
    app = http_app(catalog)
    generous = HttpLimits(max_header_bytes=4 * MiB, max_headers=10_000)
    async with HttpServer(app, limits=generous) as running:
        many = [f"X-H{n}: {n}" for n in range(200)]
        answer = await send_raw(running.port, post("/v1/items", *many, length=len(ITEM)), ITEM)
        assert answer.status == 431
        big = await send_raw(
            running.port, post("/v1/items", "X-Pad: " + "p" * 64 * 1024, length=len(ITEM)), ITEM
        )
        assert big.status == 431


async def test_json_nested_10000_deep_is_400(server: HttpServer) -> None:
    body = b"[" * 10_000 + b"]" * 10_000
    answer = await send_raw(server.port, post("/v1/items", length=len(body)), body)
    assert answer.status == 400
    assert "nests deeper than 32" in orjson.loads(answer.body)["detail"]


async def test_json_depth_is_allowed_up_to_the_limit(server: HttpServer) -> None:
    at_limit = b'{"name":"n","price":1,"tags":' + b"[" * 31 + b"]" * 31 + b"}"
    over = b'{"name":"n","price":1,"tags":' + b"[" * 32 + b"]" * 32 + b"}"
    assert (
        await send_raw(server.port, post("/v1/items", length=len(at_limit)), at_limit)
    ).status == 422
    assert (await send_raw(server.port, post("/v1/items", length=len(over)), over)).status == 400


def test_the_depth_check_ignores_brackets_inside_strings() -> None:
    assert not json_depth_exceeds(b'{"a":"' + b"[" * 100 + b'"}', 32)
    assert not json_depth_exceeds(b'["\\"[[[[", ' + b"[]," * 50 + b"1]", 2)
    assert json_depth_exceeds(b"[" * 33 + b"]" * 33, 32)
    assert not json_depth_exceeds(b"[" * 32 + b"]" * 32, 32)
    assert json_depth_exceeds(b'{"a":' * 40 + b"1" + b"}" * 40, 32)


async def test_a_gzip_bomb_is_413_after_inflating_no_more_than_the_limit(
    server: HttpServer,
) -> None:
    bomb = inflating_to(64 * MiB)
    assert len(bomb) < 128 * 1024
    answer = await send_raw(
        server.port, post("/v1/items", "Content-Encoding: gzip", length=len(bomb)), bomb
    )
    assert answer.status == 413
    assert "inflates" in orjson.loads(answer.body)["detail"]


async def test_a_gzipped_body_is_read_and_unknown_encodings_are_415(server: HttpServer) -> None:
    packed = gzip.compress(b'{"name":"stool","price":9}')
    answer = await send_raw(
        server.port, post("/v1/items", "Content-Encoding: gzip", length=len(packed)), packed
    )
    assert answer.status == 201
    assert orjson.loads(answer.body)["name"] == "stool"
    brotli = await send_raw(
        server.port, post("/v1/items", "Content-Encoding: br", length=len(ITEM)), ITEM
    )
    assert brotli.status == 415


async def trickle_until_closed(port: int) -> float | None:
    """Send a request's headers a byte every 0.1 s; seconds until the server closed, or None."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    trickle = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"s" * 1000
    try:
        for byte in trickle:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), timeout=0.1) == b"":
                    return loop.time() - started
            except TimeoutError:
                continue
    except ConnectionError:
        return loop.time() - started
    finally:
        writer.close()
    return None


async def test_a_slowloris_is_cut_at_the_header_read_timeout(server: HttpServer) -> None:
    """Headers trickled a byte every 0.1 s never complete; the 1 s timeout closes the connection."""
    closed_after = await trickle_until_closed(server.port)
    assert closed_after is not None, "the server kept a trickling connection open"
    assert 0.9 <= closed_after < 5.0


async def test_a_silent_connection_and_a_slow_second_request_are_cut_too(
    server: HttpServer,
) -> None:
    """The timer runs from the connection's opening, and again from each request's first byte."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = loop.time()
    try:
        assert await asyncio.wait_for(reader.read(1), timeout=5.0) == b""
        assert loop.time() - started >= 0.9
    finally:
        writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert (await read_answer(reader)).status == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: te")  # and then nothing more
        started = loop.time()
        assert await asyncio.wait_for(reader.read(1), timeout=5.0) == b""
        assert loop.time() - started >= 0.9
    finally:
        writer.close()


# -- the whole suite, while the server is watched -----------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_the_server_answers_health_checks_throughout_the_abuse(server: HttpServer) -> None:
    """Every DEV-25 input, three rounds at once beside five slowloris connections, while
    /healthz is polled with a 1 s deadline and RSS grows by less than 50 MiB."""
    big_header = post("/v1/items", "X-Padding: " + "p" * 64 * 1024, length=len(ITEM))
    many_headers = post("/v1/items", *[f"X-H{n}: {n}" for n in range(200)], length=len(ITEM))
    deep = b"[" * 10_000 + b"]" * 10_000
    chunked_body = b'{"name":"' + b"a" * (MiB + 1) + b'","price":1}'
    bomb = inflating_to(64 * MiB)
    abuse: list[tuple[Callable[[], Awaitable[Answer]], int]] = [
        (lambda: send_raw(server.port, post("/v1/items", length=MiB + 1)), 413),
        (
            lambda: send_raw(
                server.port,
                post("/v1/items", "Transfer-Encoding: chunked"),
                chunked(chunked_body, 64 * 1024),
                chunk=64 * 1024,
            ),
            413,
        ),
        (lambda: send_raw(server.port, big_header, ITEM), 431),
        (lambda: send_raw(server.port, many_headers, ITEM), 431),
        (lambda: send_raw(server.port, post("/v1/items", length=len(deep)), deep), 400),
        (lambda: send_raw(server.port, post("/v1/items", length=10_000_020), b"x" * 65536), 413),
        (
            lambda: send_raw(
                server.port, post("/v1/items", "Content-Encoding: gzip", length=len(bomb)), bomb
            ),
            413,
        ),
    ]
    health: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                started = loop.time()
                async with session.get(
                    f"{server.url}/healthz", timeout=aiohttp.ClientTimeout(total=1.0)
                ) as answer:
                    assert answer.status == 200
                    assert await answer.json() == {"status": "ok"}
                health.append(loop.time() - started)
                await asyncio.sleep(0.02)

    before = rss_bytes()
    watcher = asyncio.create_task(watch())
    slowloris = [asyncio.create_task(trickle_until_closed(server.port)) for _ in range(5)]
    try:
        for _ in range(3):
            answers = await asyncio.gather(*(attempt() for attempt, _ in abuse))
            assert [a.status for a in answers] == [status for _, status in abuse]
        cut = await asyncio.gather(*slowloris)
        assert all(after is not None for after in cut), cut
    finally:
        stop.set()
        await watcher
    assert len(health) >= 3
    assert max(health) < 1.0
    assert rss_bytes() - before < 50 * MiB
