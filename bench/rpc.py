"""Workload 11: REST versus gRPC for the same typed handler, beside their baselines.

Each server of ``bench.rpc_apps`` runs alone in a child process; this process
is the client, the same one for every server of a protocol (aiohttp's client
for the three HTTP servers, a ``protoc``-generated grpc.aio stub for both gRPC
servers), so the figures differ only in the server. Per server:

* bytes on the wire per call: both directions, counted by a TCP relay in front
  of the server over ``WIRE_CALLS`` calls on one warm connection;
* latency p50/p99 at concurrency 1 (``Sizes.requests`` calls after a warm-up);
* throughput at concurrency ``CONCURRENCY`` (``Sizes.concurrent_requests`` x 4 calls).

Targets (issue 5): wirework REST >= 1.0x FastAPI's throughput and >= 0.75x
the plain Starlette handler's; wirework gRPC >= 0.85x plain grpcio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.idle import percentile
from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from bench.rpc_apps import HTTP_KINDS, KINDS, PRICE, generated_modules
from bench.sqlite_procs import ROOT

CONCURRENCY = 32
WIRE_CALLS = 200
WARM_UP = 50
STARTUP_TIMEOUT = 30.0
BODY = {"sku": "sku-0042", "qty": 3, "currency": "EUR"}

Call = Callable[[], Awaitable[None]]


def check(total: float, qty: int) -> None:
    if total != PRICE * qty:
        raise RuntimeError(f"wrong answer: total {total} for qty {qty}")


@contextlib.asynccontextmanager
async def server(kind: str, directory: Path) -> AsyncIterator[int]:
    """One ``bench.rpc_apps`` child; yields its port, stops it with SIGTERM."""
    port_file = directory / f"{kind}.port"
    port_file.unlink(missing_ok=True)  # a repeat must not read the last run's port
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.rpc_apps", kind, str(port_file), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start (exit {process.returncode})")
            await asyncio.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def http_caller(port: int) -> AsyncIterator[Call]:
    import aiohttp
    import orjson

    body = orjson.dumps(BODY)
    url = f"http://127.0.0.1:{port}/v1/quote"
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                answer = orjson.loads(await response.read())
            check(answer["total"], BODY["qty"])  # type: ignore[arg-type]

        yield call


@contextlib.asynccontextmanager
async def grpc_caller(port: int, modules: tuple[Any, Any]) -> AsyncIterator[Call]:
    import grpc  # type: ignore[import-untyped]

    messages, stubs = modules
    request = messages.QuoteRequest(**BODY)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stubs.BenchQuotesStub(channel)

        async def call() -> None:
            answer = await stub.Quote(request, timeout=30)
            check(answer.total, BODY["qty"])  # type: ignore[arg-type]

        yield call


class Relay:
    """A TCP relay that counts the bytes it carries both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.carried = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                self.carried += len(chunk)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


async def measure(kind: str, port: int, sizes: Sizes, modules: tuple[Any, Any]) -> dict[str, float]:
    def caller(at: int) -> contextlib.AbstractAsyncContextManager[Call]:
        return http_caller(at) if kind in HTTP_KINDS else grpc_caller(at, modules)

    relay = Relay(port)
    relay_port = await relay.start()
    try:
        async with caller(relay_port) as call:
            for _ in range(WARM_UP):
                await call()
            relay.carried = 0
            for _ in range(WIRE_CALLS):
                await call()
            wire = relay.carried / WIRE_CALLS
    finally:
        await relay.close()
    async with caller(port) as call:
        for _ in range(WARM_UP):
            await call()
        samples = []
        for _ in range(sizes.requests):
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1000)
        calls = sizes.concurrent_requests * 4
        share = calls // CONCURRENCY

        async def worker() -> None:
            for _ in range(share):
                await call()

        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(CONCURRENCY):
                tasks.create_task(worker())
        seconds = time.perf_counter() - started
    return {
        "wire": wire,
        "p50": statistics.median(samples),
        "p99": percentile(samples, 99),
        "rate": share * CONCURRENCY / seconds,
    }


async def run_all(sizes: Sizes) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    with scratch() as tmp:
        directory = Path(tmp)
        modules = generated_modules(directory / "client")
        for _ in range(sizes.repeat):
            for kind in KINDS:
                async with server(kind, directory) as port:
                    found = await measure(kind, port, sizes, modules)
                results[kind].append(found)
                print(
                    f"  {kind}: {found['rate']:,.0f} req/s at {CONCURRENCY}, p50 "
                    f"{found['p50']:.2f} ms, p99 {found['p99']:.2f} ms, "
                    f"{found['wire']:.0f} B/call",
                    flush=True,
                )
    return {
        kind: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for kind, runs in results.items()
    }


def rest_vs_grpc(sizes: Sizes) -> list[Figure]:
    found = asyncio.run(run_all(sizes))
    rest, fastapi, plain = found["wirework-rest"], found["fastapi"], found["starlette"]
    grpc_ours, grpcio = found["wirework-grpc"], found["grpcio"]
    note = (
        f"servers in their own process; client: aiohttp (HTTP) / protoc stub on grpc.aio "
        f"(gRPC); {sizes.requests:,} calls at concurrency 1, "
        f"{sizes.concurrent_requests * 4:,} at {CONCURRENCY}; median of {sizes.repeat}"
    )
    figures = [
        Figure(
            "11a",
            f"REST throughput, concurrency {CONCURRENCY}",
            rest["rate"],
            "req/s",
            floor=plain["rate"],
            floor_name="baseline",
            min_ratio=0.75,
            peer=fastapi["rate"],
            peer_name="FastAPI",
            min_peer_ratio=1.0,
            notes=[f"baseline = plain Starlette handler; {note}"],
        ),
        Figure(
            "11b",
            f"gRPC throughput, concurrency {CONCURRENCY}",
            grpc_ours["rate"],
            "req/s",
            floor=grpcio["rate"],
            floor_name="baseline",
            min_ratio=0.85,
            notes=["baseline = plain grpcio servicer on protoc classes of the emitted .proto"],
        ),
        Figure(
            "11c",
            "REST latency p50, concurrency 1",
            rest["p50"],
            "ms",
            floor=plain["p50"],
            floor_name="baseline",
            higher_is_better=False,
            peer=fastapi["p50"],
            peer_name="FastAPI",
        ),
        Figure(
            "11d",
            "REST latency p99, concurrency 1",
            rest["p99"],
            "ms",
            floor=plain["p99"],
            floor_name="baseline",
            higher_is_better=False,
            peer=fastapi["p99"],
            peer_name="FastAPI",
        ),
        Figure(
            "11e",
            "gRPC latency p50, concurrency 1",
            grpc_ours["p50"],
            "ms",
            floor=grpcio["p50"],
            floor_name="baseline",
            higher_is_better=False,
        ),
        Figure(
            "11f",
            "gRPC latency p99, concurrency 1",
            grpc_ours["p99"],
            "ms",
            floor=grpcio["p99"],
            floor_name="baseline",
            higher_is_better=False,
        ),
        Figure(
            "11g",
            "bytes on the wire per call: REST (baseline: gRPC)",
            rest["wire"],
            "B",
            floor=grpc_ours["wire"],
            floor_name="baseline",
            higher_is_better=False,
            notes=[
                f"both directions, through a counting TCP relay, {WIRE_CALLS} calls on one "
                f"warm connection; FastAPI {fastapi['wire']:.0f} B, Starlette "
                f"{plain['wire']:.0f} B, grpcio {grpcio['wire']:.0f} B"
            ],
        ),
    ]
    for figure in figures:
        progress(figure)
    return figures
