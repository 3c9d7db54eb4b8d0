"""A real server and the real client over loopback: every streaming kind, end to end."""

from __future__ import annotations

import decimal
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from tests.grpc_binding.shop import (
    PLACED_AT,
    Address,
    Line,
    Order,
    OrderEvent,
    PlaceOrder,
    Priority,
    Status,
    Summary,
    chat,
    get_order,
    place_order,
    upload,
    watch,
)
from wirework.errors import BadRequestError, ConfigurationError
from wirework.grpc import GrpcClient, GrpcServer
from wirework.grpc.codec import InvalidMessageError
from wirework.registry import Registry
from wirework.service import Service


async def test_unary_call_returns_the_handlers_model_with_every_field_intact(
    client: GrpcClient,
) -> None:
    order_id = uuid.uuid4()

    order = await client.call(get_order, order_id=order_id, verbose=True, timeout=5)

    assert order == Order(
        id=order_id,
        status=Status.SHIPPED,
        lines=[Line(sku="apple", qty=2)],
        total=decimal.Decimal("3.10"),
        placed_at=PLACED_AT,
        note="verbose",
    )


async def test_a_body_request_with_nested_optional_enum_and_map_fields_round_trips(
    client: GrpcClient,
) -> None:
    request = PlaceOrder(
        lines=[Line(sku="pear", qty=3), Line(sku="fig", qty=1)],
        ship_to=Address(street="1 Main St", city="Lyon"),
        priority=Priority.HIGH,
        tags={"gift": "yes"},
    )

    order = await client.call(place_order, order=request, idempotency_key="key-1", timeout=5)

    assert order.ship_to == request.ship_to
    assert order.priority is Priority.HIGH
    assert order.note is None
    assert order.tags == {"gift": "yes"}
    assert order.by_sku == {"pear": Line(sku="pear", qty=3), "fig": Line(sku="fig", qty=1)}
    assert order.total == decimal.Decimal(1)
    assert order.idempotency_key == "key-1"  # the metadata reached CallContext


async def test_absent_optional_fields_take_the_models_defaults(client: GrpcClient) -> None:
    order = await client.call(place_order, order=PlaceOrder(lines=[Line(sku="a", qty=1)]))

    assert (order.priority, order.ship_to, order.tags, order.idempotency_key) == (
        Priority.LOW,
        None,
        {},
        None,
    )


async def test_a_server_stream_is_an_async_iterator_of_models(client: GrpcClient) -> None:
    events = [event async for event in client.stream(watch, order_id="o-1", count=4)]

    assert events == [OrderEvent(order_id="o-1", seq=n, status=Status.OPEN) for n in range(4)]


async def test_a_client_stream_takes_an_async_iterable_or_a_plain_one(client: GrpcClient) -> None:
    async def lines() -> AsyncIterator[Line]:
        for qty in (1, 2, 3):
            yield Line(sku="s", qty=qty)

    assert await client.call(upload, lines=lines(), timeout=5) == Summary(lines=3, units=6)
    assert await client.call(upload, lines=[{"sku": "s", "qty": 5}]) == Summary(lines=1, units=5)
    assert await client.call(upload, lines=[]) == Summary(lines=0, units=0)


async def test_a_bidirectional_stream_answers_message_by_message(client: GrpcClient) -> None:
    replies = client.stream(chat, lines=[Line(sku="a", qty=1), Line(sku="b", qty=5)])

    assert [line async for line in replies] == [Line(sku="a", qty=2), Line(sku="b", qty=10)]


async def test_an_endpoint_without_a_response_model_returns_none(client: GrpcClient) -> None:
    result: object = await client.call("Cancel", order_id="o-1")

    assert result is None


async def test_endpoints_are_also_reached_by_grpc_or_python_name(client: GrpcClient) -> None:
    by_rpc = await client.call("GetOrder", order_id=str(uuid.UUID(int=5)))
    by_function = await client.call("get_order", order_id=uuid.UUID(int=5))

    assert by_rpc == by_function
    assert isinstance(by_rpc, Order)


async def test_bad_arguments_fail_locally_naming_the_fields(client: GrpcClient) -> None:
    with pytest.raises(InvalidMessageError, match=r"order_id: Input should be a valid UUID") as bad:
        await client.call(get_order, order_id="not-a-uuid")
    assert [field for field, _ in bad.value.violations] == ["order_id"]
    with pytest.raises(BadRequestError, match=r"\['colour'\] are not among them"):
        await client.call(get_order, order_id=uuid.uuid4(), colour="red")
    with pytest.raises(BadRequestError, match=r"Upload: qty: Input should be greater than 0"):
        await client.call(upload, lines=[{"sku": "s", "qty": 0}])


async def test_the_wrong_call_shape_or_an_unknown_endpoint_is_a_configuration_error(
    client: GrpcClient,
) -> None:
    with pytest.raises(ConfigurationError, match=r"call it with stream\(\)"):
        await client.call(watch, order_id="o")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"no gRPC endpoint 'Nope'"):
        await client.call("Nope")


class Who(BaseModel):
    name: str


def twin(label: str) -> Service:
    """One of two instances of service ``twins``: same contract, each answers its own label."""
    twins = Service("twins")

    @twins.get("/v1/who")
    async def who() -> Who:
        return Who(name=label)

    return twins


async def test_calls_turn_round_robin_across_a_registrys_addresses() -> None:
    async with GrpcServer(twin("a")) as first, GrpcServer(twin("b")) as second:
        registry = Registry({"twins": [f"grpc://{first.address}", f"grpc://{second.address}"]})
        async with GrpcClient(twin("caller"), registry=registry) as client:
            names = [(await client.call("Who", timeout=5)).name for _ in range(4)]

    assert names == ["a", "b", "a", "b"]


async def test_calls_turn_round_robin_across_explicit_addresses() -> None:
    async with GrpcServer(twin("a")) as first, GrpcServer(twin("b")) as second:
        addresses = [first.address, f"grpc://{second.address}"]
        async with GrpcClient("twins", twin("caller").endpoints, address=addresses) as client:
            names = [(await client.call("Who", timeout=5)).name for _ in range(3)]

    assert names == ["a", "b", "a"]


def test_a_client_is_refused_a_setup_it_cannot_use() -> None:
    with pytest.raises(ConfigurationError, match="needs the service's endpoints"):
        GrpcClient("twins", address="127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="not both"):
        GrpcClient(twin("x"), address="127.0.0.1:1", registry=Registry({}))
    with pytest.raises(ConfigurationError, match="TLS"):
        GrpcClient(twin("x"), address="grpcs://127.0.0.1:1")


async def test_a_registry_without_the_service_says_where_to_add_it() -> None:
    async with GrpcClient(twin("x"), registry=Registry({})) as client:
        with pytest.raises(ConfigurationError, match="no grpc address for service 'twins'"):
            await client.call("Who")


async def test_a_failing_client_stream_iterator_raises_its_own_error(client: GrpcClient) -> None:
    async def lines() -> AsyncIterator[Line]:
        yield Line(sku="a", qty=1)
        raise ValueError("the caller's source broke")

    with pytest.raises(ValueError, match="source broke"):
        await client.call(upload, lines=lines(), timeout=5)
    with pytest.raises(ValueError, match="source broke"):
        async for _ in client.stream(chat, lines=lines(), timeout=5):
            pass
