"""The gRPC client under wirework.resilience policies, against a real server that fails
on purpose: retried only when safe, and each attempt on the next address."""

from __future__ import annotations

import uuid

import pytest

from tests.grpc_binding.shop import Attempts, attempts, flaky, flaky_post, svc
from wirework.errors import ServiceUnavailableError
from wirework.grpc import GrpcClient, GrpcServer
from wirework.resilience import Pipeline, Retry, RetrySettings, Timeout


def retrying() -> Pipeline:
    settings = RetrySettings(max_attempts=3, base_delay=0.01, max_delay=0.05)
    return Pipeline(Timeout(5), Retry(settings, name="grpc-shop"), name="grpc-shop")


async def test_an_idempotent_call_is_retried_until_it_succeeds(server: GrpcServer) -> None:
    key = uuid.uuid4().hex
    async with GrpcClient(svc, address=server.address, policy=retrying()) as client:
        result = await client.call(flaky, key=key, failures=2)

    assert result == Attempts(count=3)


async def test_a_post_without_an_idempotency_key_is_never_retried(server: GrpcServer) -> None:
    key = uuid.uuid4().hex
    async with GrpcClient(svc, address=server.address, policy=retrying()) as client:
        with pytest.raises(ServiceUnavailableError, match="attempt 1"):
            await client.call(flaky_post, key=key, failures=1)

    assert attempts[key] == 1


async def test_a_post_with_an_idempotency_key_is_retried(server: GrpcServer) -> None:
    key = uuid.uuid4().hex
    async with GrpcClient(svc, address=server.address, policy=retrying()) as client:
        result = await client.call(flaky_post, key=key, failures=1, idempotency_key=key)

    assert result == Attempts(count=2)
