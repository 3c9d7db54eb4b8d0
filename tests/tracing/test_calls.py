"""Server and client spans for REST and gRPC calls: context in, a span around, context out.

The bindings wrap each call in these; here two real HTTP hops over aiohttp
(a client calling a server that calls another) show the trace continuing
across both with a new parent id per call, and a bad traceparent restarting it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from wirework.errors import NotFoundError
from wirework.tracing import TraceContextPropagator
from wirework.tracing.calls import (
    client_span,
    record_grpc_status,
    record_http_status,
    server_span,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def servers(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> AsyncIterator[str]:
    """``/front`` calls ``/back`` twice; both wrap their handling in server spans."""
    provider, _ = recorded
    base = ""

    async def back(request: web.Request) -> web.Response:
        with server_span("GET /back", request.headers, provider=provider) as span:
            if request.query.get("missing"):
                record_http_status(span, 404, server=True)
                return web.Response(status=404)
            record_http_status(span, 200, server=True)
            return web.Response(text="ok")

    async def front(request: web.Request) -> web.Response:
        with server_span("GET /front", request.headers.items(), provider=provider):
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    headers: dict[str, str] = {}
                    with client_span("GET", headers, provider=provider) as span:
                        async with session.get(f"{base}/back", headers=headers) as reply:
                            record_http_status(span, reply.status, server=False)
            return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/front", front)
    app.router.add_get("/back", back)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    yield base
    await runner.cleanup()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


@pytest.mark.parametrize(
    ("traceparent", "kept"),
    [(f"00-{TRACE}-00f067aa0ba902b7-01", True), ("00-not-a-trace", False), (None, False)],
    ids=["valid", "bad", "none"],
)
async def test_a_call_chain_is_one_trace_with_a_new_parent_per_call(
    servers: str,
    recorded: tuple[TracerProvider, InMemorySpanExporter],
    traceparent: str | None,
    kept: bool,
) -> None:
    _, exporter = recorded
    headers = {"TraceParent": traceparent} if traceparent else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{servers}/front", headers=headers) as reply,
    ):
        assert reply.status == 200
    spans = by_name(exporter)
    (front,) = spans["GET /front"]
    clients, backs = spans["GET"], spans["GET /back"]
    assert len(clients) == len(backs) == 2
    assert front.context is not None
    trace_ids = {s.context.trace_id for s in [front, *clients, *backs] if s.context}
    assert len(trace_ids) == 1
    assert (f"{trace_ids.pop():032x}" == TRACE) is kept
    if kept:
        assert front.parent is not None
        assert f"{front.parent.span_id:016x}" == "00f067aa0ba902b7"
    else:
        assert front.parent is None
    client_ids = {c.context.span_id for c in clients if c.context}
    assert len(client_ids) == 2
    assert {b.parent.span_id for b in backs if b.parent} == client_ids
    assert all(c.parent is not None and c.parent.span_id == front.context.span_id for c in clients)
    assert all(b.attributes and b.attributes["http.response.status_code"] == 200 for b in backs)


def test_a_4xx_raised_on_purpose_does_not_fail_the_server_span(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    with pytest.raises(NotFoundError), server_span("GET /orders/{id}", {}, provider=provider):
        raise NotFoundError("no order 7")
    with pytest.raises(RuntimeError), server_span("GET /orders/{id}", {}, provider=provider):
        raise RuntimeError("database gone")
    with pytest.raises(NotFoundError), client_span("GET", {}, provider=provider):
        raise NotFoundError("no order 7")
    server_404, server_500, client_404 = exporter.get_finished_spans()
    assert server_404.status.is_ok
    assert server_404.events[0].name == "exception"
    assert not server_500.status.is_ok
    assert not client_404.status.is_ok


@pytest.mark.parametrize(
    ("code", "server", "failed"),
    [
        ("OK", True, False),
        ("NOT_FOUND", True, False),
        ("NOT_FOUND", False, True),
        ("UNAVAILABLE", True, True),
        ("OK", False, False),
    ],
)
def test_grpc_status_fails_spans_as_the_rpc_conventions_say(
    recorded: tuple[TracerProvider, InMemorySpanExporter], code: str, server: bool, failed: bool
) -> None:
    provider, exporter = recorded
    with server_span("shop.Orders/Get", {}, provider=provider) as span:
        record_grpc_status(span, code, 5, server=server)
    (finished,) = exporter.get_finished_spans()
    assert finished.status.is_ok is not failed
    assert finished.attributes is not None
    assert finished.attributes["rpc.grpc.status_code"] == 5


def test_a_call_leaving_the_system_can_keep_the_tracestate_inside(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = recorded
    incoming = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "tracestate": "vendor=secret"}
    inside: dict[str, str] = {}
    outside: dict[str, str] = {}
    with server_span("GET /front", incoming, provider=provider):
        with client_span("GET", inside, provider=provider):
            pass
        with client_span(
            "GET",
            outside,
            provider=provider,
            propagator=TraceContextPropagator(forward_tracestate=False),
        ):
            pass
    assert inside["tracestate"] == "vendor=secret"
    assert "tracestate" not in outside
    assert outside["traceparent"].split("-")[1] == TRACE
