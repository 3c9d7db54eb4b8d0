"""configure_tracing: where spans go by default and with the standard OTEL_* variables,
OTLP export into a real in-process OTLP/HTTP receiver, and bounded, counted queues."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from pydantic import BaseModel

from wirework.brokers import connect
from wirework.errors import ConfigurationError
from wirework.service import Service
from wirework.testing.conformance import wait_until
from wirework.tracing import Tracing, configure_tracing, instrument
from wirework.tracing.processor import BatchProcessor

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_RESOURCE_ATTRIBUTES",
    "WIREWORK_SPAN_STORE",
    "WIREWORK_PROPAGATORS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the default store, .wirework/spans.db, lands here


def build(made: list[Tracing], name: str = "orders", **options: object) -> Tracing:
    tracing = configure_tracing(name, set_global=False, schedule_delay=0.05, **options)  # type: ignore[arg-type]
    made.append(tracing)
    return tracing


def test_with_nothing_configured_spans_go_to_the_embedded_store(
    built: list[Tracing], tmp_path: Path
) -> None:
    tracing = build(built)
    assert list(tracing.processors) == ["store"]
    assert tracing.store is not None
    assert tracing.store.path == Path(".wirework/spans.db")
    assert (tmp_path / ".wirework" / "spans.db").exists()
    with tracing.provider.get_tracer("t").start_as_current_span("one"):
        pass
    assert tracing.force_flush()
    assert [t.root_name for t in tracing.store.recent()] == ["one"]
    assert tracing.store.recent()[0].root_service == "orders"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, ["otlp"], id="endpoint"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"},
            ["otlp"],
            id="traces endpoint",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "WIREWORK_SPAN_STORE": "s.db"},
            ["otlp", "store"],
            id="endpoint and store",
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, [], id="none"),
        pytest.param({"OTEL_TRACES_EXPORTER": "console"}, ["console"], id="console"),
        pytest.param({"WIREWORK_SPAN_STORE": "elsewhere.db"}, ["store"], id="store path"),
    ],
)
def test_the_environment_chooses_the_exporters(
    built: list[Tracing],
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    expected: list[str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert list(build(built).processors) == expected


def test_both_exporters_when_asked_in_code(built: list[Tracing], tmp_path: Path) -> None:
    tracing = build(built, exporters=["store", "otlp"], store=tmp_path / "x.db")
    assert list(tracing.processors) == ["store", "otlp"]


def test_the_service_name_of_the_environment_wins(
    built: list[Tracing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-eu")
    assert build(built).provider.resource.attributes["service.name"] == "orders-eu"


def test_a_disabled_sdk_records_nothing(
    built: list[Tracing], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = build(built)
    assert not tracing.enabled
    assert tracing.processors == {}
    with tracing.provider.get_tracer("t").start_as_current_span("one") as span:
        assert not span.is_recording()
    assert not (tmp_path / ".wirework").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"exporters": ["jaeger"]}, "unknown span exporter", id="exporter"),
        pytest.param({"sample_ratio": 1.5}, "sample_ratio", id="ratio"),
        pytest.param({"propagators": "xray"}, "unknown trace propagator", id="propagator"),
    ],
)
def test_bad_settings_are_refused(
    built: list[Tracing], options: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build(built, "orders", **options)


def test_an_unknown_exporter_in_the_environment_is_refused(
    built: list[Tracing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,zipkinn")
    with pytest.raises(ConfigurationError, match="OTEL_TRACES_EXPORTER"):
        build(built)


def test_sampling_follows_the_trace_id_not_the_callers_flag(built: list[Tracing]) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    tracing = build(built, sample_ratio=0.5, exporters=["none"])
    tracer = tracing.provider.get_tracer("t")
    low, high = 1, (1 << 128) - 1  # below and above the ratio's bound
    for trace_id, sampled in ((low, True), (high, False)):
        for flag in (TraceFlags.DEFAULT, TraceFlags.SAMPLED):
            remote = SpanContext(trace_id, 5, is_remote=True, trace_flags=TraceFlags(flag))
            context = trace.set_span_in_context(NonRecordingSpan(remote))
            with tracer.start_as_current_span("s", context=context) as span:
                assert span.is_recording() is sampled


# -- bounded queues ----------------------------------------------------------------------


@dataclass
class GatedExporter(SpanExporter):
    """Holds the first batch until released, as a collector that stopped answering would."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    received: list[str] = field(default_factory=list)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        self.received.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS


def test_a_full_queue_drops_and_counts_and_never_blocks() -> None:
    exporter = GatedExporter()
    processor = BatchProcessor(exporter, max_queue_size=4, max_batch_size=1)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("first"):
        pass
    assert exporter.entered.wait(10)
    for n in range(10):  # the exporter is stuck: none of these may wait for it
        with tracer.start_as_current_span(f"s{n}"):
            pass
    assert (processor.stats.queued, processor.stats.dropped) == (5, 6)
    exporter.release.set()
    assert processor.force_flush(10_000)
    assert exporter.received == ["first", "s0", "s1", "s2", "s3"]
    assert processor.stats.exported == 5
    provider.shutdown()


def test_bad_batching_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        BatchProcessor(GatedExporter(), max_queue_size=0)


# -- OTLP into a real receiver -----------------------------------------------------------


@dataclass
class Receiver:
    """An OTLP/HTTP receiver: decodes each ExportTraceServiceRequest it is sent."""

    url: str
    requests: list[ExportTraceServiceRequest]

    def span_names(self) -> list[str]:
        return [
            span.name
            for request in self.requests
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield Receiver(url=f"http://{host}:{port}", requests=received)
    await runner.cleanup()


class OrderPlaced(BaseModel):
    order_id: str


async def test_spans_reach_the_collector_named_by_the_environment(
    built: list[Tracing], monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    tracing = build(built, "orders-otlp")
    assert list(tracing.processors) == ["otlp"]
    broker = connect("memory://")
    orders = Service("orders", broker=broker)
    seen: list[str] = []

    @orders.subscribe("orders")
    async def placed(event: OrderPlaced) -> None:
        seen.append(event.order_id)

    instrument(orders, provider=tracing.provider)
    async with orders:
        await orders.publish("orders", OrderPlaced(order_id="o-1"))
        await wait_until(lambda: seen == ["o-1"], what="the event handled")

    async def exported() -> bool:
        # force_flush blocks on the export, whose reply needs this event loop: a thread.
        await asyncio.to_thread(tracing.force_flush, 5.0)
        return sorted(receiver.span_names()) == ["orders process", "orders publish"]

    await wait_until(exported, what="both spans at the receiver")
    await broker.aclose()
    resource = receiver.requests[0].resource_spans[0].resource
    attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert attributes["service.name"] == "orders-otlp"
    spans = {
        span.name: span
        for request in receiver.requests
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    }
    publish, process = spans["orders publish"], spans["orders process"]
    assert process.trace_id == publish.trace_id
    assert process.parent_span_id == publish.span_id
    assert tracing.stats()["otlp"].exported == 2


def test_the_public_names_are_sorted_and_importable() -> None:
    import wirework.tracing as tracing_package

    assert tracing_package.__all__ == sorted(tracing_package.__all__)
    for name in tracing_package.__all__:
        assert getattr(tracing_package, name) is not None


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: the global provider is per process."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_the_global_provider_is_set_once_and_a_second_try_says_what_to_do(
    tmp_path: Path,
) -> None:
    code = (
        "from opentelemetry import trace\n"
        "from wirework.errors import ConfigurationError\n"
        "from wirework.tracing import configure_tracing\n"
        "first = configure_tracing('a', exporters=['none'])\n"
        "assert trace.get_tracer_provider() is first.provider\n"
        "try:\n"
        "    configure_tracing('b', exporters=['none'])\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "set_global=False" in result.stdout


def test_a_forked_worker_keeps_exporting(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "from wirework.tracing import SpanStore, configure_tracing\n"
        "tracing = configure_tracing('parent', store='spans.db', set_global=False)\n"
        "tracer = tracing.provider.get_tracer('t')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    with tracer.start_as_current_span('in the child'):\n"
        "        pass\n"
        "    os._exit(0 if tracing.force_flush(10) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "print([t.root_name for t in SpanStore('spans.db', create=False).recent()])\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "['in the child']" in result.stdout


def test_an_unusable_store_path_fails_at_configuration(
    built: list[Tracing], tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigurationError, match="span store"):
        build(built, store=tmp_path / "file" / "spans.db")


def test_the_providers_of_one_span_store_file_share_its_processor(tmp_path: Path) -> None:
    """One thread and one connection per file in a process; each provider's shutdown
    exports what is queued and only the last one (a second shutdown not counting)
    closes the file."""
    path = tmp_path / "spans.db"
    options: dict[str, object] = {"exporters": ["store"], "store": path, "set_global": False}
    orders = configure_tracing("orders", **options)  # type: ignore[arg-type]
    billing = configure_tracing("billing", **options)  # type: ignore[arg-type]
    elsewhere = configure_tracing(
        "other", exporters=["store"], store=tmp_path / "other.db", set_global=False
    )
    shared = orders.processors["store"]
    assert billing.processors["store"] is shared
    assert billing.store is orders.store
    assert elsewhere.processors["store"] is not shared
    with orders.provider.get_tracer("t").start_as_current_span("by orders"):
        pass
    orders.shutdown()
    orders.shutdown()  # counts once: billing keeps its processor
    with billing.provider.get_tracer("t").start_as_current_span("by billing"):
        pass
    assert billing.force_flush()
    assert billing.store is not None
    assert sorted(t.root_name for t in billing.store.recent()) == ["by billing", "by orders"]
    assert shared.stats.exported == 2
    billing.shutdown()
    with billing.provider.get_tracer("t").start_as_current_span("after the last shutdown"):
        pass
    assert shared.stats.dropped == 1  # closed now
    again = configure_tracing("orders", **options)  # type: ignore[arg-type]
    assert again.processors["store"] is not shared  # a closed processor is not shared
    again.shutdown()
    elsewhere.shutdown()
