"""Reading an endpoint handler's signature: what is path, query, body, stream, context."""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel, ValidationError

from wirework.errors import ConfigurationError
from wirework.service import CallContext, Service
from wirework.service.endpoints import inspect_endpoint


class PlaceOrder(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    id: str
    sku: str
    qty: int


class Status(enum.StrEnum):
    OPEN = "open"
    SHIPPED = "shipped"


class Clock:
    pass


async def get_order(order_id: uuid.UUID, verbose: bool = False) -> Order:
    return Order(id=str(order_id), sku="x", qty=1)


async def place_order(order: PlaceOrder, ctx: CallContext, clock: Clock) -> Order:
    return Order(id="1", **order.model_dump())


async def amend(order_id: str, order: PlaceOrder, status: Status | None = None) -> Order:
    return Order(id=order_id, **order.model_dump())


async def watch(order_id: str) -> AsyncIterator[Order]:
    yield Order(id=order_id, sku="x", qty=1)


async def upload(orders: AsyncIterator[PlaceOrder]) -> Order:
    return Order(id="1", sku="x", qty=1)


async def chat(orders: AsyncIterator[PlaceOrder]) -> AsyncIterator[Order]:
    yield Order(id="1", sku="x", qty=1)


async def cancel(order_id: str) -> None:
    return None


def test_path_and_query_parameters_are_told_apart_and_validated_together() -> None:
    endpoint = inspect_endpoint(get_order, method="GET", path="/v1/orders/{order_id}")

    assert [(p.name, p.source, p.required) for p in endpoint.params] == [
        ("order_id", "path", True),
        ("verbose", "query", False),
    ]
    assert (endpoint.name, endpoint.streaming, endpoint.status_code) == ("GetOrder", "unary", 200)
    assert endpoint.idempotent
    assert endpoint.body_model is None
    params = endpoint.params_model.model_validate({"order_id": str(uuid.UUID(int=7))})
    assert params.model_dump() == {"order_id": uuid.UUID(int=7), "verbose": False}
    with pytest.raises(ValidationError):
        endpoint.params_model.model_validate({"order_id": "not-a-uuid"})


def test_a_body_alone_is_the_request_message_and_dependencies_are_found() -> None:
    endpoint = inspect_endpoint(place_order, method="POST", path="/v1/orders")

    assert endpoint.body_is_request
    assert endpoint.request_model is PlaceOrder
    assert endpoint.context_name == "ctx"
    assert dict(endpoint.dependencies) == {"clock": Clock}
    assert not endpoint.idempotent  # POST: only retried with an Idempotency-Key


def test_params_and_body_make_one_request_model_that_splits_back() -> None:
    endpoint = inspect_endpoint(amend, method="PATCH", path="/v1/orders/{order_id}")

    request = endpoint.request_model.model_validate(
        {"order_id": "o-1", "order": {"sku": "s", "qty": 2}, "status": "open"}
    )
    values = endpoint.split_request(request)
    assert values == {"order_id": "o-1", "status": Status.OPEN, "order": PlaceOrder(sku="s", qty=2)}


@pytest.mark.parametrize(
    ("function", "method", "streaming"),
    [(watch, "GET", "server"), (upload, "POST", "client"), (chat, "POST", "bidi")],
)
def test_streams_are_read_from_the_annotations(
    function: object, method: str, streaming: str
) -> None:
    path = "/v1/orders/{order_id}/watch" if function is watch else "/v1/stream"
    endpoint = inspect_endpoint(function, method=method, path=path)  # type: ignore[arg-type]

    assert endpoint.streaming == streaming
    assert endpoint.returns is Order


def test_no_return_model_means_204() -> None:
    endpoint = inspect_endpoint(cancel, method="DELETE", path="/v1/orders/{order_id}")

    assert (endpoint.returns, endpoint.status_code, endpoint.idempotent) == (None, 204, True)


async def _get_with_body(order: PlaceOrder) -> Order:
    return Order(id="1", **order.model_dump())


async def _missing_param() -> Order:
    return Order(id="1", sku="x", qty=1)


async def _list_param(ids: list[str]) -> Order:
    return Order(id="1", sku="x", qty=1)


async def _returns_list(order_id: str) -> list[Order]:
    return []


def _sync(order_id: str) -> Order:
    return Order(id=order_id, sku="x", qty=1)


@pytest.mark.parametrize(
    ("function", "method", "path", "says"),
    [
        (_get_with_body, "GET", "/v1/orders", "GET carries no body"),
        (_missing_param, "GET", "/v1/orders/{order_id}", "add `order_id: str`"),
        (_list_param, "GET", "/v1/orders", "parameter 'ids'"),
        (_returns_list, "GET", "/v1/orders/{order_id}", "wrap a list"),
        (_sync, "GET", "/v1/orders/{order_id}", "must be an `async def`"),
        (cancel, "DELETE", "v1/orders/{order_id}", "must start with '/'"),
        (watch, "GET", "/v1/{order_id}/{order_id}", "repeats a placeholder"),
    ],
)
def test_a_wrong_signature_fails_at_decoration_with_what_to_write(
    function: object, method: str, path: str, says: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        inspect_endpoint(function, method=method, path=path)  # type: ignore[arg-type]
    assert says in str(caught.value)


def test_service_decorators_collect_endpoints_and_refuse_duplicates() -> None:
    svc = Service("orders")
    svc.get("/v1/orders/{order_id}")(get_order)
    svc.post("/v1/orders")(place_order)

    assert [(e.method, e.path, e.name) for e in svc.endpoints] == [
        ("GET", "/v1/orders/{order_id}", "GetOrder"),
        ("POST", "/v1/orders", "PlaceOrder"),
    ]
    with pytest.raises(ConfigurationError, match="both named 'GetOrder'"):
        svc.get("/v2/orders/{order_id}")(get_order)
    with pytest.raises(ConfigurationError, match="both answer POST /v1/orders"):
        svc.post("/v1/orders", name="PlaceAgain")(place_order)


def test_dependencies_resolve_through_the_service() -> None:
    svc = Service("orders")
    svc.provide(Clock, Clock)
    endpoint = inspect_endpoint(place_order, method="POST", path="/v1/orders")
    context = CallContext(service_name="orders", endpoint="PlaceOrder", protocol="http")

    arguments = endpoint.arguments({"order": PlaceOrder(sku="s", qty=1)}, context, svc.resolve)

    assert arguments["ctx"] is context
    assert isinstance(arguments["clock"], Clock)
    assert arguments["clock"] is svc.resolve(Clock, "again")
