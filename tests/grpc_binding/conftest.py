"""A real ``GrpcServer`` on a free loopback port, and a real ``GrpcClient`` pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.grpc_binding.shop import svc
from wirework.grpc import GrpcClient, GrpcServer


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    async with GrpcServer(svc, port=0) as running:
        yield running


@pytest.fixture
async def client(server: GrpcServer) -> AsyncIterator[GrpcClient]:
    async with GrpcClient(svc, address=server.address) as connected:
        yield connected
