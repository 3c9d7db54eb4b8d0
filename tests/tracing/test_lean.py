"""Lean spans: the span store gets the same spans from them as from the SDK's spans, and
a provider falls back to the SDK's spans as soon as anything but the store listens."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from wirework.errors import ConfigurationError
from wirework.tracing import SpanRecord, Tracing, configure_tracing
from wirework.tracing.lean import LeanSpan, LeanTracerProvider
from wirework.tracing.setup import LEAN_SPANS_ENV

REMOTE = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "x")]),
)


def store_tracing(
    built: list[Tracing], path: Path, monkeypatch: pytest.MonkeyPatch, *, lean: bool
) -> Tracing:
    monkeypatch.setenv(LEAN_SPANS_ENV, "1" if lean else "0")
    tracing = configure_tracing(
        "orders", exporters=["store"], store=path, schedule_delay=0.05, set_global=False
    )
    built.append(tracing)
    return tracing


def some_spans(tracing: Tracing) -> None:
    """One of everything the span API offers, under a remote parent with a tracestate."""
    tracer = tracing.provider.get_tracer("t")
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    with tracer.start_as_current_span(
        "root", context=remote, kind=SpanKind.SERVER, attributes={"tags": ["a", "b"], "n": 1}
    ) as root:
        root.set_attribute("later", True)
        root.add_event("checked", {"stock": 3}, timestamp=5)
        child = tracer.start_span("child", kind=SpanKind.PRODUCER, attributes={"x": 1.5})
        child.update_name("renamed")
        child.set_status(StatusCode.OK)
        child.set_status(StatusCode.ERROR, "ignored: OK is final")
        child.end()
        child.set_attribute("after end", "ignored")
        with pytest.raises(ValueError, match="boom"), tracer.start_as_current_span("failing"):
            raise ValueError("boom")


def comparable(records: list[SpanRecord]) -> list[dict[str, Any]]:
    """The records with ids replaced by their order, and no times or stack traces."""
    ids = {r.span_id: n for n, r in enumerate(records)}
    out: list[dict[str, Any]] = []
    for record in records:
        events = [
            {**e, "time_ns": None, "attributes": {**e["attributes"], "exception.stacktrace": ""}}
            if e["name"] == "exception"
            else e
            for e in record.events
        ]
        out.append(
            {
                **record.model_dump(exclude={"span_id", "start_ns", "end_ns", "trace_id"}),
                "parent_id": ids.get(record.parent_id or "", record.parent_id),
                "events": events,
                "same_trace": record.trace_id == records[0].trace_id,
            }
        )
    return out


def test_the_store_gets_the_same_spans_from_lean_and_sdk_spans(
    built: list[Tracing], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found: dict[bool, list[dict[str, Any]]] = {}
    for lean in (True, False):
        tracing = store_tracing(built, tmp_path / f"{lean}.db", monkeypatch, lean=lean)
        some_spans(tracing)
        assert tracing.force_flush()
        assert tracing.store is not None
        records = tracing.store.spans(f"{REMOTE.trace_id:032x}")
        found[lean] = comparable(sorted(records, key=lambda r: r.name))
    assert found[True] == found[False]
    by_name = {r["name"]: r for r in found[True]}
    assert by_name["root"]["parent_id"] == f"{REMOTE.span_id:016x}"
    assert by_name["root"]["attributes"]["tags"] == ["a", "b"]
    assert by_name["renamed"]["status"] == "OK"
    assert by_name["failing"]["status"] == "ERROR"
    assert by_name["failing"]["events"][0]["name"] == "exception"


def test_children_carry_the_parents_trace_state_and_flags(
    built: list[Tracing], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = store_tracing(built, tmp_path / "spans.db", monkeypatch, lean=True)
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    span = tracing.provider.get_tracer("t").start_span("s", context=remote)
    assert isinstance(span, LeanSpan)
    context = span.get_span_context()
    assert (context.trace_id, context.trace_state) == (REMOTE.trace_id, REMOTE.trace_state)
    assert context.trace_flags.sampled
    assert context.is_valid
    assert not context.is_remote
    span.end()


def test_any_other_processor_gets_the_sdks_spans_and_the_store_still_gets_them(
    built: list[Tracing], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing = store_tracing(built, tmp_path / "spans.db", monkeypatch, lean=True)
    tracer = tracing.provider.get_tracer("t")  # taken before the second processor came
    with tracer.start_as_current_span("lean") as span:
        assert isinstance(span, LeanSpan)
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracer.start_as_current_span("sdk") as span:
        assert isinstance(span, ReadableSpan)
    assert [s.name for s in exporter.get_finished_spans()] == ["sdk"]
    assert tracing.force_flush()
    assert tracing.store is not None
    assert sorted(t.root_name for t in tracing.store.recent()) == ["lean", "sdk"]


def test_a_sampled_out_trace_makes_no_lean_span(
    built: list[Tracing], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LEAN_SPANS_ENV, "1")
    tracing = configure_tracing(
        "orders", store=tmp_path / "spans.db", sample_ratio=0.5, set_global=False
    )
    built.append(tracing)
    tracer = tracing.provider.get_tracer("t")
    for trace_id, sampled in ((1, True), ((1 << 128) - 1, False)):
        parent = SpanContext(trace_id, 5, is_remote=True, trace_flags=TraceFlags(1))
        span = tracer.start_span("s", context=trace.set_span_in_context(NonRecordingSpan(parent)))
        assert isinstance(span, LeanSpan) is sampled
        assert span.get_span_context().trace_flags.sampled is sampled
        span.end()


def test_a_provider_without_the_store_makes_the_sdks_spans() -> None:
    provider = LeanTracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("one") as span:
        assert isinstance(span, ReadableSpan)
    assert len(exporter.get_finished_spans()) == 1
    provider.shutdown()


def test_queued_lean_spans_are_records_not_spans(
    built: list[Tracing], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What waits for its batch is a tuple, not the span: the span, its context and its
    event list go with the handler's frame (lean.py says what that saves)."""
    monkeypatch.setenv(LEAN_SPANS_ENV, "1")
    tracing = configure_tracing(
        "orders",
        exporters=["store"],
        store=tmp_path / "spans.db",
        schedule_delay=60,
        set_global=False,
    )
    built.append(tracing)
    tracer = tracing.provider.get_tracer("t")
    for n in range(20):
        with tracer.start_as_current_span(f"s{n}", attributes={"n": n}) as span:
            assert isinstance(span, LeanSpan)
    del span
    gc.collect()
    assert tracing.stats()["store"].queued == 20
    assert not [o for o in gc.get_objects() if isinstance(o, LeanSpan)]
    assert tracing.force_flush()
    assert tracing.store is not None
    assert sorted(
        s.name for t in tracing.store.recent(20) for s in tracing.store.spans(t.trace_id)
    ) == sorted(f"s{n}" for n in range(20))


def test_a_processor_without_put_cannot_take_lean_spans() -> None:
    provider = LeanTracerProvider()
    with pytest.raises(ConfigurationError, match="cannot take lean spans"):
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()), lean=True)
    provider.shutdown()
