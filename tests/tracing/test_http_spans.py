"""REST calls as spans: the client's CLIENT span is the parent of the server's SERVER span.

Both sides get their own SDK tracer provider with an in-memory exporter (the
global provider is left alone, so test order does not matter), over a real
uvicorn server and aiohttp.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from tests.tracing.conftest import exported
from wirework.errors import NotFoundError
from wirework.http import HttpClient, HttpServer, http_app
from wirework.service import Service


class Item(BaseModel):
    sku: str


svc = Service("traced-catalog")


@svc.get("/v1/items/{sku}")
async def get_item(sku: str) -> Item:
    if sku == "missing":
        raise NotFoundError(f"no item {sku!r}")
    if sku == "broken":
        raise RuntimeError("a bug")
    return Item(sku=sku)


def recording() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
async def traced() -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    provider, exporter = recording()
    async with HttpServer(http_app(svc, tracer_provider=provider)) as server:
        yield server.url, exporter


async def test_the_client_span_is_the_parent_of_the_server_span(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    url, server_spans = traced
    client_provider, client_spans = recording()
    async with HttpClient(svc, address=url, tracer_provider=client_provider) as client:
        assert await client.call(get_item, sku="kettle") == Item(sku="kettle")

    (client_span,) = client_spans.get_finished_spans()
    (server_span,) = await exported(server_spans)
    assert client_span.kind is SpanKind.CLIENT
    assert server_span.kind is SpanKind.SERVER
    assert server_span.name == "GET /v1/items/{sku}"
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.attributes is not None
    assert server_span.attributes["http.response.status_code"] == 200
    assert server_span.attributes["http.route"] == "/v1/items/{sku}"


async def test_a_4xx_is_recorded_but_only_a_5xx_fails_the_server_span(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    url, server_spans = traced
    async with aiohttp.ClientSession() as session:
        for sku in ("missing", "broken"):
            async with session.get(f"{url}/v1/items/{sku}") as response:
                await response.read()

    by_status = {
        (span.attributes or {}).get("http.response.status_code"): span
        for span in await exported(server_spans, servers=2)
    }
    assert set(by_status) == {404, 500}
    assert by_status[404].status.status_code is not StatusCode.ERROR
    assert by_status[500].status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "garbage",
    ],
)
async def test_a_caller_traceparent_is_followed_and_a_bad_one_restarts_the_trace(
    traced: tuple[str, InMemorySpanExporter], traceparent: str
) -> None:
    url, server_spans = traced
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/items/kettle", headers={"TraceParent": traceparent}) as response,
    ):
        assert response.status == 200  # never fails the request

    (span,) = await exported(server_spans)
    if traceparent.startswith("00-0af7"):
        assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    else:
        assert span.parent is None
        assert span.context.trace_id != 0
