"""Errors, deadlines and limits over a real server: what the caller gets, and that the
server keeps answering."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
import pytest

from tests.grpc_binding.shop import (
    MISSING_ORDER,
    Blob,
    Line,
    OrderEvent,
    OutOfStockError,
    PlaceOrder,
    Size,
    get_order,
    place_order,
    seen_deadlines,
    size,
    slow,
    slow_cancelled,
    svc,
    watch,
)
from wirework.errors import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    NotFoundError,
    RemoteError,
    TooManyRequestsError,
)
from wirework.grpc import GrpcClient, GrpcLimits, GrpcServer
from wirework.grpc.codec import Codec, InvalidMessageError
from wirework.grpc.health import SERVING, HealthCheckRequest, HealthCheckResponse
from wirework.grpc.proto import derive
from wirework.grpc.status import BadRequest, ErrorInfo, RpcStatus, error_from_status
from wirework.resilience.deadline import Deadline, deadline_scope
from wirework.testing.conformance import wait_until

MiB = 1024 * 1024
T = TypeVar("T")
SERVICE = "/wirework.grpc_shop.GrpcShop"


async def first_success(call: Callable[[], Awaitable[T]], *, within: float = 5.0) -> T:
    """``call()``'s result once it stops being refused for lack of a free slot."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except TooManyRequestsError:
            assert time.monotonic() < deadline, "the server never freed the slot"
            await asyncio.sleep(0.01)


async def raw_call(address: str, method: str, request: bytes) -> Any:
    """Send bytes the typed client would refuse to send; return the grpc error."""
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"{SERVICE}/{method}")(request, timeout=5)
    return caught.value


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        data = await check(HealthCheckRequest(service=service).SerializeToString(), timeout=5)
    status: int = HealthCheckResponse.FromString(data).status
    return status


# -- errors map once -------------------------------------------------------------------


async def test_a_call_error_keeps_its_class_message_code_and_status_details(
    client: GrpcClient,
) -> None:
    with pytest.raises(NotFoundError, match=f"no order {MISSING_ORDER}") as caught:
        await client.call(get_order, order_id=MISSING_ORDER, timeout=5)

    rpc_error = caught.value.__cause__
    assert isinstance(rpc_error, grpc.aio.AioRpcError)
    assert rpc_error.code() == grpc.StatusCode.NOT_FOUND
    trailers = dict(rpc_error.trailing_metadata())
    assert trailers["wirework-error-type"] == "wirework.errors.NotFoundError"
    status = RpcStatus.FromString(trailers["grpc-status-details-bin"])
    assert (status.code, status.message) == (5, rpc_error.details())
    (detail,) = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.ErrorInfo"
    info = ErrorInfo.FromString(detail.value)
    assert (info.reason, info.domain) == ("NOT_FOUND_ERROR", "wirework")
    assert dict(info.metadata) == {"type": "wirework.errors.NotFoundError"}


async def test_a_users_own_error_class_is_rebuilt_as_itself(client: GrpcClient) -> None:
    order = PlaceOrder(lines=[Line(sku="unobtainium", qty=1)])

    with pytest.raises(OutOfStockError, match="out of stock") as caught:
        await client.call(place_order, order=order, timeout=5)

    assert caught.value.__cause__.code() == grpc.StatusCode.ABORTED  # type: ignore[union-attr]


async def test_an_unexpected_exception_is_internal_generic_and_logged(
    client: GrpcClient, caplog: pytest.LogCaptureFixture
) -> None:
    order = PlaceOrder(lines=[Line(sku="boom", qty=1)])

    with (
        caplog.at_level(logging.ERROR, logger="wirework.grpc"),
        pytest.raises(RemoteError) as caught,
    ):
        await client.call(place_order, order=order, timeout=5)

    assert caught.value.remote_type == "grpc.INTERNAL"
    assert "secret" not in str(caught.value)
    assert "the server's log has the details" in str(caught.value)
    (record,) = [r for r in caplog.records if r.name == "wirework.grpc"]
    assert record.exc_info is not None
    assert "secret internal detail" in str(record.exc_info[1])


async def test_the_server_validates_requests_and_names_every_bad_field(
    server: GrpcServer,
) -> None:
    codec = Codec(derive(svc)).codec("PlaceOrder")
    message = codec.message_class()
    message.lines.add(sku="", qty=0)  # breaks min_length and gt, which protobuf cannot see

    error = await raw_call(server.address, "PlaceOrder", message.SerializeToString())

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lines.0.sku: String should have at least 1 character" in error.details()
    assert "lines.0.qty: Input should be greater than 0" in error.details()
    rebuilt = error_from_status(error.code().name, error.details(), error.trailing_metadata())
    assert isinstance(rebuilt, InvalidMessageError)
    assert isinstance(rebuilt, BadRequestError)
    status = RpcStatus.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
    (bad_request,) = [d for d in status.details if d.type_url.endswith("google.rpc.BadRequest")]
    violations = BadRequest.FromString(bad_request.value).field_violations
    assert [(v.field, v.description) for v in violations] == [
        ("lines.0.sku", "String should have at least 1 character"),
        ("lines.0.qty", "Input should be greater than 0"),
    ]


async def test_bytes_that_are_not_the_message_are_invalid_argument(server: GrpcServer) -> None:
    error = await raw_call(server.address, "PlaceOrder", b"\xff\xff\xff")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid wirework.grpc_shop.PlaceOrder" in error.details()


async def test_an_error_mid_stream_arrives_after_the_items_sent_before_it(
    client: GrpcClient,
) -> None:
    received: list[OrderEvent] = []

    async def read_all() -> None:
        async for event in client.stream(watch, order_id="o-1", count=101, timeout=5):
            received.append(event)

    with pytest.raises(NotFoundError, match="only 100 events"):
        await read_all()

    assert len(received) == 100


def test_a_foreign_servers_status_maps_to_the_codes_class_or_remote_error() -> None:
    assert isinstance(error_from_status("NOT_FOUND", "gone", ()), NotFoundError)
    assert isinstance(error_from_status("RESOURCE_EXHAUSTED", "quota", ()), TooManyRequestsError)
    unknown = error_from_status("DATA_LOSS", "bits fell out", ())
    assert isinstance(unknown, RemoteError)
    assert (unknown.remote_type, unknown.remote_message) == ("grpc.DATA_LOSS", "bits fell out")
    unregistered = error_from_status("ABORTED", "m", (("wirework-error-type", "x.Nope"),))
    assert isinstance(unregistered, RemoteError)
    assert unregistered.remote_type == "x.Nope"


# -- deadlines -------------------------------------------------------------------------


#: The deadline travels as gRPC's ``grpc-timeout`` header, which grpc-core encodes
#: rounding up ("encoding may round up", its timeout_encoding.h; below a second, to whole
#: milliseconds): the server may see up to 1 ms more than the caller had left (0.40063 s
#: of a 0.4 s deadline in a fresh-clone run).
GRPC_TIMEOUT_UNIT = 0.001


async def test_a_passed_deadline_is_deadline_exceeded_and_the_handler_saw_and_lost_it(
    client: GrpcClient,
) -> None:
    seen_deadlines.clear()
    slow_cancelled.clear()

    with pytest.raises(DeadlineExceededError) as caught:
        await client.call(slow, timeout=0.5)

    assert caught.value.__cause__.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    (remaining,) = seen_deadlines
    assert remaining is not None
    assert 0 < remaining <= 0.5 + GRPC_TIMEOUT_UNIT
    await wait_until(lambda: len(slow_cancelled) == 1, 5, what="the handler cancelled")
    assert slow_cancelled[0] < 0.1  # ...at the deadline, not long before


async def test_the_callers_own_deadline_bounds_a_call_without_a_timeout(
    client: GrpcClient,
) -> None:
    seen_deadlines.clear()
    started = time.monotonic()

    with deadline_scope(Deadline.after(0.4, source="test")), pytest.raises(DeadlineExceededError):
        await client.call(slow, timeout=30)

    assert time.monotonic() - started < 5
    (remaining,) = seen_deadlines
    assert remaining is not None
    assert remaining <= 0.4 + GRPC_TIMEOUT_UNIT


async def test_without_a_deadline_the_handler_sees_none(client: GrpcClient) -> None:
    seen_deadlines.clear()

    result = await client.call(slow)

    assert result.remaining is None
    assert seen_deadlines == [None]


# -- limits (RELIABILITY.md DEV-25) ---------------------------------------------------


async def test_an_oversized_message_is_resource_exhausted_and_the_server_stays_healthy(
    server: GrpcServer,
) -> None:
    big = Blob(data="x" * (5 * MiB))
    async with GrpcClient(svc, address=server.address, max_send_message_bytes=16 * MiB) as sender:

        async def oversized() -> BaseException:
            with pytest.raises(TooManyRequestsError) as caught:
                await sender.call(size, blob=big, timeout=10)
            return caught.value

        async def checks() -> list[int]:
            return [await health(server.address) for _ in range(5)]

        error, during = await asyncio.gather(oversized(), checks())
        after = await sender.call(size, blob=Blob(data="y" * 1000), timeout=5)

    assert error.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    assert during == [SERVING] * 5
    assert await health(server.address) == SERVING
    assert await health(server.address, "wirework.grpc_shop.GrpcShop") == SERVING
    assert after == Size(chars=1000)


async def test_64_kib_of_metadata_is_resource_exhausted_and_the_server_stays_healthy(
    client: GrpcClient, server: GrpcServer
) -> None:
    with pytest.raises(TooManyRequestsError, match="metadata size exceeds") as caught:
        await client.call(size, blob=Blob(data="x"), metadata={"x-big": "a" * 65536}, timeout=5)

    assert caught.value.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    assert await health(server.address) == SERVING
    assert await client.call(size, blob=Blob(data="xy"), timeout=5) == Size(chars=2)


async def test_the_client_refuses_to_send_over_its_own_limit(client: GrpcClient) -> None:
    with pytest.raises(TooManyRequestsError) as caught:
        await client.call(size, blob=Blob(data="x" * (5 * MiB)), timeout=10)

    assert caught.value.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]


async def test_a_lower_receive_limit_is_enforced() -> None:
    limits = GrpcLimits(max_receive_message_bytes=1024)
    async with (
        GrpcServer(svc, limits=limits) as server,
        GrpcClient(svc, address=server.address) as client,
    ):
        assert await client.call(size, blob=Blob(data="x" * 900)) == Size(chars=900)
        with pytest.raises(TooManyRequestsError):
            await client.call(size, blob=Blob(data="x" * 2048))


async def test_health_of_an_unknown_service_is_not_found(server: GrpcServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(server.address, "wirework.nope.Nope")

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_port_in_use_is_a_configuration_error(server: GrpcServer) -> None:
    with pytest.raises(ConfigurationError, match="in use"):
        async with GrpcServer(svc, port=server.port):
            pass


async def test_calls_over_max_concurrent_rpcs_are_refused_while_the_others_run() -> None:
    seen_deadlines.clear()
    slow_cancelled.clear()
    limits = GrpcLimits(max_concurrent_rpcs=1)
    async with (
        GrpcServer(svc, limits=limits) as server,
        GrpcClient(svc, address=server.address) as client,
    ):
        busy = asyncio.create_task(client.call(slow, timeout=3))
        await wait_until(lambda: len(seen_deadlines) == 1, 5, what="the slot taken")

        with pytest.raises(TooManyRequestsError) as caught:
            await client.call(size, blob=Blob(data="x"), timeout=5)

        assert caught.value.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
        await wait_until(lambda: len(slow_cancelled) == 1, 5, what="the cancel reaching it")
        assert await first_success(lambda: client.call(size, blob=Blob(data="ok"))) == Size(chars=2)
