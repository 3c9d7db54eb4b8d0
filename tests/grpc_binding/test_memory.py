"""RELIABILITY.md DEV-25's measure for gRPC: oversized messages leave the server's
memory (a separate process, measured from outside) within 50 MiB, and it stays healthy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.grpc_binding.shop import Blob, Size, size, svc
from wirework.errors import TooManyRequestsError
from wirework.grpc import GrpcClient

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
SERVER = """
import asyncio, sys
from tests.grpc_binding.shop import svc
from wirework.grpc import GrpcServer

async def main() -> None:
    async with GrpcServer(svc) as server:
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@pytest.fixture
def server_process() -> Iterator[tuple[psutil.Process, int]]:
    """A GrpcServer in its own process (stdin closed = stop); yields it and its port."""
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        port = int(child.stdout.readline())  # the child prints it once bound, or exits
        yield psutil.Process(child.pid), port
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


@pytest.mark.slow
async def test_oversized_messages_cost_the_server_under_50_mib(
    server_process: tuple[psutil.Process, int],
) -> None:
    process, port = server_process
    big = Blob(data="x" * (5 * MiB))
    async with GrpcClient(
        svc, address=f"127.0.0.1:{port}", max_send_message_bytes=16 * MiB
    ) as client:
        assert await client.call(size, blob=Blob(data="x"), timeout=10) == Size(chars=1)
        before = process.memory_info().rss

        refused = 0
        for _ in range(30):
            with pytest.raises(TooManyRequestsError):
                await client.call(size, blob=big, timeout=10)
            refused += 1
        grown = (process.memory_info().rss - before) / MiB

        assert refused == 30
        assert grown < 50, f"the server grew by {grown:.1f} MiB over 30 refused 5 MiB messages"
        answers = await asyncio.gather(
            *(client.call(size, blob=Blob(data="ok"), timeout=10) for _ in range(5))
        )
        assert answers == [Size(chars=2)] * 5
