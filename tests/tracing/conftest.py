"""Tracing fixtures: providers of the test's own (never the global one), one span store file.

OpenTelemetry's global provider can be set once per process, so every test
builds its providers with ``set_global=False`` and shuts them down itself;
no test depends on another having run first.
"""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.helpers.services import require_service
from wirework.brokers import connect
from wirework.brokers.base import Broker
from wirework.testing.conformance import wait_until
from wirework.tracing import SpanRecord, SpanStore, TraceSummary, Tracing, configure_tracing

TracingFactory = Callable[[str], Tracing]
BrokerFactory = Callable[[], "Broker | str"]


@pytest.fixture
def built() -> Iterator[list[Tracing]]:
    """Tracings a test configured itself (append them): shut down after it."""
    made: list[Tracing] = []
    yield made
    for tracing in made:
        tracing.shutdown()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "spans.db"


@pytest.fixture
def tracing_for(store_path: Path) -> Iterator[TracingFactory]:
    """``tracing_for("billing")``: a provider of the test's own writing to ``store_path``."""
    made: list[Tracing] = []

    def make(service_name: str) -> Tracing:
        tracing = configure_tracing(
            service_name,
            exporters=["store"],
            store=store_path,
            schedule_delay=0.05,
            set_global=False,
        )
        made.append(tracing)
        return tracing

    yield make
    for tracing in made:
        tracing.shutdown()


#: The server brokers, each with the service ``require_service`` checks first.
SERVERS = {
    "redis": ("redis://127.0.0.1:6379/0", ("Redis", "127.0.0.1", 6379)),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672/", ("RabbitMQ", "127.0.0.1", 5672)),
    "nats": ("nats://127.0.0.1:4222", ("NATS", "127.0.0.1", 4222)),
}


@pytest.fixture(
    params=["memory", "sqlite", *(pytest.param(name, marks=pytest.mark.ext) for name in SERVERS)]
)
async def broker_for(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BrokerFactory]:
    """What each service of a flow gets: one shared in-memory broker, or the URL of one
    broker that each service opens for itself (as separate processes would): a SQLite
    file, or a server in a namespace of this test's, purged afterwards."""
    if request.param == "memory":
        shared = connect("memory://")
        yield lambda: shared
        await shared.aclose()
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/broker.db?durability=fast"
        yield lambda: url
    else:
        server, service = SERVERS[request.param]
        require_service(*service)
        namespace = f"wwtest-{uuid.uuid4().hex[:12]}"
        url = f"{server}?namespace={namespace}"
        try:
            yield lambda: url
        finally:
            module = importlib.import_module(f"wirework.brokers.{request.param}")
            await module.purge_namespace(server, namespace)


async def flushed_lookup(
    tracings: list[Tracing], lookup: Callable[[], list[TraceSummary]]
) -> list[TraceSummary]:
    """What ``lookup`` finds once it finds anything (flushing every provider first)."""

    async def found() -> bool:
        for tracing in tracings:
            await asyncio.to_thread(tracing.force_flush, 5.0)
        return bool(lookup())

    await wait_until(found, what="a trace in the span store")
    return lookup()


async def flushed_trace(
    tracings: list[Tracing], store: SpanStore, trace_id: str, spans: int
) -> list[SpanRecord]:
    """The trace's spans once ``spans`` of them are stored (flushing every provider)."""

    async def complete() -> bool:
        for tracing in tracings:
            await asyncio.to_thread(tracing.force_flush, 5.0)
        return len(store.spans(trace_id)) >= spans

    await wait_until(complete, what=f"{spans} spans of trace {trace_id} in the span store")
    return store.spans(trace_id)


async def exported(
    exporter: InMemorySpanExporter, *, servers: int = 1, clients: int = 0
) -> list[ReadableSpan]:
    """The exporter's spans once ``servers`` SERVER and ``clients`` CLIENT spans have ended:
    a server's span ends after its answer is sent, so the caller may hold the answer before
    that span is exported (REST and gRPC alike)."""

    def ended() -> bool:
        kinds = [span.kind for span in exporter.get_finished_spans()]
        return kinds.count(SpanKind.SERVER) >= servers and kinds.count(SpanKind.CLIENT) >= clients

    await wait_until(ended, what=f"{servers} server and {clients} client span(s)")
    return list(exporter.get_finished_spans())
