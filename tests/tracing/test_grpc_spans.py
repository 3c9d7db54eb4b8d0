"""gRPC calls traced end to end: a real server and client on a loopback port, in one process.

Each test gives the server and the client providers of their own (as two
processes would have) that export to one in-memory exporter, so the test
sees both sides' spans and checks how they link.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import cast

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from tests.tracing.conftest import exported
from wirework.errors import NotFoundError, WireworkError
from wirework.grpc import GrpcClient, GrpcServer
from wirework.service import Service

svc = Service("traced-grpc")


class Greeting(BaseModel):
    text: str


@svc.get("/v1/greet/{name}")
async def greet(name: str) -> Greeting:
    """Answer; a name of ``missing`` is the caller's mistake, ``broken`` a server bug."""
    if name == "missing":
        raise NotFoundError(f"nobody called {name}")
    if name == "broken":
        raise RuntimeError("a bug on purpose")
    return Greeting(text=f"hello {name}")


@svc.get("/v1/count/{n}")
async def count(n: int) -> AsyncIterator[Greeting]:
    """Stream ``n`` greetings."""
    for i in range(n):
        yield Greeting(text=str(i))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def providers(exporter: InMemorySpanExporter) -> Iterator[tuple[TracerProvider, TracerProvider]]:
    """The server's provider and the client's, both exporting to ``exporter``."""
    made = (TracerProvider(), TracerProvider())
    for provider in made:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield made
    for provider in made:
        provider.shutdown()


@pytest.fixture
async def server(providers: tuple[TracerProvider, TracerProvider]) -> AsyncIterator[GrpcServer]:
    async with GrpcServer(svc, port=0, tracer_provider=providers[0]) as running:
        yield running


@pytest.fixture
async def client(
    server: GrpcServer, providers: tuple[TracerProvider, TracerProvider]
) -> AsyncIterator[GrpcClient]:
    async with GrpcClient(svc, address=server.address, tracer_provider=providers[1]) as made:
        yield made


def one(spans: list[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    found = [span for span in spans if span.kind is kind]
    assert len(found) == 1, [(span.name, span.kind) for span in spans]
    return found[0]


async def test_client_span_is_the_server_span_parent(
    server: GrpcServer, client: GrpcClient, exporter: InMemorySpanExporter
) -> None:
    answer = await client.call(greet, name="ada", timeout=5)
    assert answer.text == "hello ada"

    spans = await exported(exporter, clients=1)
    caller, served = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert caller.context is not None
    assert served.context is not None
    assert served.context.trace_id == caller.context.trace_id
    assert served.parent is not None
    assert served.parent.span_id == caller.context.span_id
    assert served.parent.is_remote
    assert caller.name == served.name == "wirework.traced_grpc.TracedGrpc/Greet"
    for span in (caller, served):
        attributes = dict(span.attributes or {})
        assert attributes["rpc.system"] == "grpc"
        assert attributes["rpc.service"] == "wirework.traced_grpc.TracedGrpc"
        assert attributes["rpc.method"] == "Greet"
        assert attributes["rpc.grpc.status_code"] == 0
        assert attributes["server.port"] == server.port
        assert span.status.status_code is StatusCode.UNSET


async def test_each_attempt_is_a_new_client_span_under_the_current_one(
    client: GrpcClient, exporter: InMemorySpanExporter, providers: tuple[TracerProvider, ...]
) -> None:
    tracer = providers[1].get_tracer("test")
    with tracer.start_as_current_span("checkout") as outer:
        await client.call(greet, name="a", timeout=5)
        await client.call(greet, name="b", timeout=5)
    spans = await exported(exporter, servers=2, clients=2)
    callers = [span for span in spans if span.kind is SpanKind.CLIENT]
    served = [span for span in spans if span.kind is SpanKind.SERVER]
    trace_id = outer.get_span_context().trace_id
    assert len(callers) == len(served) == 2
    assert {s.parent.span_id for s in callers if s.parent} == {outer.get_span_context().span_id}
    assert {s.parent.span_id for s in served if s.parent} == {
        s.context.span_id for s in callers if s.context
    }
    assert {s.context.trace_id for s in spans if s.context} == {trace_id}


async def test_a_bad_traceparent_restarts_the_trace_and_the_call_succeeds(
    server: GrpcServer, exporter: InMemorySpanExporter
) -> None:
    # An untraced client (no provider, none global) so only the bad header is sent.
    async with GrpcClient(svc, address=server.address) as plain:
        answer = await plain.call(
            greet, name="ada", timeout=5, metadata={"traceparent": "00-not-a-trace-01"}
        )
    assert answer.text == "hello ada"
    served = one(await exported(exporter), SpanKind.SERVER)
    assert served.parent is None
    assert served.context is not None
    assert served.context.trace_id != 0


async def test_a_callers_mistake_fails_the_client_span_only(
    client: GrpcClient, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(NotFoundError):
        await client.call(greet, name="missing", timeout=5)
    spans = await exported(exporter, clients=1)
    caller, served = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert dict(served.attributes or {})["rpc.grpc.status_code"] == 5
    assert dict(caller.attributes or {})["rpc.grpc.status_code"] == 5
    assert served.status.status_code is StatusCode.UNSET
    assert caller.status.status_code is StatusCode.ERROR


async def test_a_server_bug_fails_both_spans(
    client: GrpcClient, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(WireworkError):
        await client.call(greet, name="broken", timeout=5)
    spans = await exported(exporter, clients=1)
    caller, served = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    for span in (caller, served):
        assert dict(span.attributes or {})["rpc.grpc.status_code"] == 13
        assert span.status.status_code is StatusCode.ERROR


async def test_a_server_stream_is_one_span_on_each_side(
    client: GrpcClient, exporter: InMemorySpanExporter
) -> None:
    texts = [item.text async for item in client.stream(count, n=3, timeout=5)]
    assert texts == ["0", "1", "2"]
    spans = await exported(exporter, clients=1)
    caller, served = one(spans, SpanKind.CLIENT), one(spans, SpanKind.SERVER)
    assert served.parent is not None
    assert caller.context is not None
    assert served.parent.span_id == caller.context.span_id
    assert dict(served.attributes or {})["rpc.grpc.status_code"] == 0


async def test_nothing_is_wrapped_when_tracing_is_not_configured() -> None:
    untraced = GrpcServer(svc, port=0)
    assert untraced._tracer is None
    async with GrpcClient(svc, address="127.0.0.1:1") as plain:
        assert plain._tracer is None


async def test_leaving_a_stream_early_ends_the_client_span_as_cancelled(
    client: GrpcClient, exporter: InMemorySpanExporter
) -> None:
    # stream() is an async generator; its declared type only promises iteration.
    stream = cast(AsyncGenerator[Greeting, None], client.stream(count, n=50, timeout=5))
    first = await anext(stream)
    await stream.aclose()
    assert first.text == "0"
    caller = one(list(exporter.get_finished_spans()), SpanKind.CLIENT)
    assert dict(caller.attributes or {})["rpc.grpc.status_code"] == 1
    assert caller.status.status_code is StatusCode.ERROR
