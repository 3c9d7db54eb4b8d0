"""``configure_tracing``: one TracerProvider whose spans go where the environment says.

With nothing configured, spans go to the embedded span store (``wirework
trace`` reads it: zero infrastructure). With the standard OpenTelemetry
variables (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``,
``OTEL_TRACES_EXPORTER``, ``OTEL_SERVICE_NAME``, ``OTEL_SDK_DISABLED``) they
go over OTLP/HTTP to the user's collector instead, or to both when the span
store is asked for as well (``WIREWORK_SPAN_STORE`` or ``exporters=``).
``OTEL_TRACES_EXPORTER=zipkin`` sends them to Zipkin instead
(``OTEL_EXPORTER_ZIPKIN_ENDPOINT``).
Every exporter sits behind its own bounded ``BatchProcessor``: a slow
collector drops and counts spans, it never slows a handler. The providers of
one process that write the same span store file share its processor (one
thread, one connection, larger batches), and so its queue and its stats.

While the span store is the only exporter, spans are ``LeanSpan``-s recorded
straight into the store's rows (``lean.py`` says why: the SDK's span was most
of tracing's cost); with any other exporter they are the SDK's.
``WIREWORK_LEAN_SPANS=0`` makes them the SDK's always (the tests run both ways).

The global provider of OpenTelemetry can be set once per process, so
``set_global=False`` builds a provider the caller passes around instead
(tests do this, and so may a process that hosts several services).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from wirework.errors import ConfigurationError
from wirework.tracing.lean import LeanTracerProvider
from wirework.tracing.processor import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SCHEDULE_DELAY,
    BatchProcessor,
    ExportStats,
)
from wirework.tracing.propagation import Propagation, build_propagation, use_propagation
from wirework.tracing.span_store import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SPANS,
    DEFAULT_PATH,
    SpanStore,
    SpanStoreExporter,
)

EXPORTER_NAMES = ("store", "otlp", "zipkin", "console", "none")
SPAN_STORE_ENV = "WIREWORK_SPAN_STORE"
LEAN_SPANS_ENV = "WIREWORK_LEAN_SPANS"


@dataclass
class Tracing:
    """What ``configure_tracing`` built: the provider, its exporters' processors, the store.

    ``provider`` is what ``instrument(service, provider=...)`` and the HTTP and
    gRPC bindings take; ``dropped`` says how many spans full queues refused.
    """

    provider: TracerProvider
    propagation: Propagation
    processors: dict[str, BatchProcessor] = field(default_factory=dict)
    store: SpanStore | None = None
    enabled: bool = True

    def stats(self) -> dict[str, ExportStats]:
        """Per exporter: spans queued, exported, dropped (queue full) and failed (the
        store's: of every provider in this process writing the same file)."""
        return {name: processor.stats for name, processor in self.processors.items()}

    @property
    def dropped(self) -> int:
        return sum(p.stats.dropped for p in self.processors.values())

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Export every span ended so far; blocks (call it through ``asyncio.to_thread``)."""
        return all(p.force_flush(int(timeout * 1000)) for p in self.processors.values())

    def shutdown(self) -> None:
        """Flush and close every exporter; spans ended afterwards are dropped."""
        self.provider.shutdown()


def configure_tracing(
    service_name: str | None = None,
    *,
    exporters: Sequence[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    max_spans: int = DEFAULT_MAX_SPANS,
    max_age: timedelta = DEFAULT_MAX_AGE,
    propagators: Iterable[str] | str | None = None,
    sample_ratio: float = 1.0,
    max_queue_size: int = DEFAULT_QUEUE_SIZE,
    schedule_delay: float = DEFAULT_SCHEDULE_DELAY,
    set_global: bool = True,
) -> Tracing:
    """Build the tracer provider for ``service_name`` (``OTEL_SERVICE_NAME`` wins if set).

    Args:
        exporters: any of ``store``, ``otlp``, ``zipkin``, ``console``, ``none``; None decides
            from the environment (see the module docstring).
        store: the span store's file (default ``WIREWORK_SPAN_STORE``, else
            ``.wirework/spans.db``).
        max_spans, max_age: the span store's retention.
        propagators: ``tracecontext``, ``b3``, ``b3multi`` (default
            ``WIREWORK_PROPAGATORS``, else ``tracecontext``); with ``set_global``
            it becomes the process's propagation and OpenTelemetry's global one.
        sample_ratio: share of traces recorded, decided from the trace id so
            every service of a trace decides alike; a caller's sampled flag is
            not obeyed (RELIABILITY.md §3.4: no forced sampling from outside).
        max_queue_size: spans waiting per exporter before new ones are dropped.
        schedule_delay: seconds between batches.
        set_global: make this the process's global provider (possible once).

    Raises:
        ConfigurationError: an unknown exporter name, a ratio outside [0, 1], or
            ``set_global`` when the global provider is already set.
    """
    if not 0.0 <= sample_ratio <= 1.0:
        raise ConfigurationError(f"sample_ratio must be within [0, 1], got {sample_ratio}")
    if set_global and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise ConfigurationError(
            "the global tracer provider is already set (configure_tracing ran before, or "
            "another library set one) and OpenTelemetry allows it once per process; pass "
            "set_global=False and hand tracing.provider to instrument(..., provider=...)"
        )
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name or "wirework"
    propagation = build_propagation(propagators)
    provider = LeanTracerProvider(
        sampler=_sampler(sample_ratio),
        resource=Resource.create({"service.name": name}),
        shutdown_on_exit=set_global,
    )
    tracing = Tracing(provider=provider, propagation=propagation)
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        tracing.enabled = False
        return tracing
    lean = lean_spans_wanted()
    try:
        for exporter_name in _exporter_names(exporters, explicit_store=store is not None):
            if exporter_name == "store":
                processor = _store_processor(
                    tracing, store, max_spans, max_age, max_queue_size, schedule_delay
                )
            else:
                exporter = _exporter(exporter_name)
                if exporter is None:
                    continue
                processor = BatchProcessor(
                    exporter, max_queue_size=max_queue_size, schedule_delay=schedule_delay
                )
            provider.add_span_processor(processor, lean=lean and exporter_name == "store")
            tracing.processors[exporter_name] = processor
    except BaseException:
        provider.shutdown()  # no exporting thread outlives a failed configuration
        raise
    if set_global:
        use_propagation(propagation)
        propagate.set_global_textmap(propagation)
        trace.set_tracer_provider(provider)
    return tracing


def lean_spans_wanted() -> bool:
    """False when ``WIREWORK_LEAN_SPANS`` is ``0``, ``false`` or ``no``: SDK spans always."""
    return os.environ.get(LEAN_SPANS_ENV, "").strip().lower() not in ("0", "false", "no")


def _sampler(ratio: float) -> Sampler:
    if ratio >= 1.0:
        return ALWAYS_ON
    if ratio <= 0.0:
        return ALWAYS_OFF
    by_trace_id = TraceIdRatioBased(ratio)
    # Local children follow their parent; a remote parent's flag is not trusted, the
    # trace id decides, as it did in the service that started the trace.
    return ParentBased(
        root=by_trace_id,
        remote_parent_sampled=by_trace_id,
        remote_parent_not_sampled=by_trace_id,
    )


def _exporter_names(names: Sequence[str] | None, *, explicit_store: bool) -> list[str]:
    if names is None:
        wanted = [n for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not wanted:
            wanted = ["otlp"] if endpoint else ["store"]
        if explicit_store or os.environ.get(SPAN_STORE_ENV):
            wanted.append("store")
        names = wanted
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name not in EXPORTER_NAMES:
            raise ConfigurationError(
                f"unknown span exporter {raw.strip()!r} (in OTEL_TRACES_EXPORTER or "
                f"exporters=...); use {', '.join(EXPORTER_NAMES)}"
            )
        if name not in chosen:
            chosen.append(name)
    return [n for n in chosen if n != "none"]


#: The span store processors of this process, by file and settings (see _store_processor).
_STORE_PROCESSORS: weakref.WeakValueDictionary[tuple[Any, ...], BatchProcessor] = (
    weakref.WeakValueDictionary()
)
_STORE_PROCESSORS_LOCK = threading.Lock()


def _store_processor(
    tracing: Tracing,
    store: str | os.PathLike[str] | None,
    max_spans: int,
    max_age: timedelta,
    max_queue_size: int,
    schedule_delay: float,
) -> BatchProcessor:
    """The processor writing the span store file: one per file (and settings) in a process.

    A process hosting several services (the shop's demo, a test, ``bench``) gives
    each its own provider; with a processor each, each had its own thread and
    SQLite connection, writing small batches that took turns on the file's
    write lock. Shared, the batches are as many times larger, and a row cost
    12 us to write instead of 19 to 26 (8 services, measured). Each provider's
    shutdown exports what is queued; the last one closes the file.
    """
    path = Path(store or os.environ.get(SPAN_STORE_ENV) or DEFAULT_PATH)
    key = (os.path.abspath(path), max_spans, max_age, max_queue_size, schedule_delay)
    with _STORE_PROCESSORS_LOCK:
        processor = _STORE_PROCESSORS.get(key)
        if processor is None or not processor.share():
            span_store = SpanStore(path, max_spans=max_spans, max_age=max_age)
            span_store.open()
            processor = BatchProcessor(
                SpanStoreExporter(span_store),
                max_queue_size=max_queue_size,
                schedule_delay=schedule_delay,
            )
            _STORE_PROCESSORS[key] = processor
    tracing.store = cast(SpanStoreExporter, processor.exporter).store
    return processor


def _exporter(name: str) -> SpanExporter | None:
    if name == "otlp":
        # Imported here: the OTLP exporter pulls in requests and protobuf, which a
        # process that only keeps spans locally does not need.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, timeout, compression and TLS come from OTEL_EXPORTER_OTLP_*.
        return OTLPSpanExporter()
    if name == "zipkin":
        # Zipkin's v2 JSON API; the endpoint comes from OTEL_EXPORTER_ZIPKIN_ENDPOINT
        # (default http://localhost:9411/api/v2/spans), the timeout from ..._TIMEOUT.
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        return ZipkinExporter()
    if name == "console":
        return ConsoleSpanExporter()
    return None
