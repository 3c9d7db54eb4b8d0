"""Spans for the embedded span store without the SDK's per-span machinery.

Profiled on the tracing bench (workload 14), the OpenTelemetry SDK's span was
most of what tracing cost: about 25 us to start and end even an empty span and
50 us with a message's ten attributes (``BoundedAttributes`` cleaning every
value under a lock, the sampler, ``SpanContext`` validation, a
``ReadableSpan`` copy at the end), against a budget of about 14 us per span
for the whole of tracing to stay within 10 % of a small flow's throughput.

When every span of a provider goes to the span store (the default: no
collector configured), nothing downstream needs a ``ReadableSpan``: the store
keeps a row. ``LeanTracerProvider`` is the SDK's provider (same resource,
sampler, shutdown and flush; ``isinstance`` checks for a configured SDK still
hold) whose tracers then make a ``LeanSpan``: a plain object implementing the
OpenTelemetry span API, with the same ids, parents, flags, trace state,
attributes, events and status as the SDK's span, handed on end straight to
the store's ``BatchProcessor``. Once any other processor is added (OTLP, the
console, a test's exporter) the same tracers make the SDK's spans again.

What an ended span hands on is an ``EndedSpan``, a plain tuple of ids, strings,
numbers and the attributes, not the span: the span, its ``SpanContext`` and its
event list are freed with the handler's frame, and what waits for its batch (up
to half a second of spans) is one object the garbage collector follows instead
of three. The queued spans had made the collector run half as often again
(780 gen-0 collections against 590 over three runs of the tracing bench) and
its full collections take longer; with records, the event loop spent 1.3 s
rather than 1.7 s on the same 26,000 spans (main-thread CPU, exporter stubbed).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping, Sequence
from random import getrandbits
from time import time_ns
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util._decorator import _agnosticcontextmanager
from opentelemetry.util.types import Attributes, AttributeValue

from wirework.errors import ConfigurationError

log = logging.getLogger("wirework.tracing")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NOT_SAMPLED_RANDOM = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
_UNSET = Status(StatusCode.UNSET)
_NO_STATE = TraceState()
#: Events kept per span, as the SDK's default ``SpanLimits`` keep.
MAX_EVENTS = 128
_KIND_NAMES = {kind: kind.name for kind in SpanKind}
_STATUS_NAMES = {code: code.name for code in StatusCode}

EndedSpan = tuple[
    int,  # trace id
    int,  # span id
    int | None,  # parent span id
    str,  # name
    str,  # kind: SpanKind's name
    str,  # the provider's service.name
    int,  # start, ns
    int,  # end, ns
    str,  # status: StatusCode's name
    str | None,  # status description
    dict[str, Any],  # attributes
    tuple[tuple[str, int, dict[str, Any]], ...] | None,  # events: (name, time ns, attributes)
]
"""A sampled ``LeanSpan`` once ended, as its processors get it (read by index)."""


@runtime_checkable
class EndedSpanSink(Protocol):
    """A processor that takes ``EndedSpan``-s: what ``add_span_processor(lean=True)`` needs."""

    def put(self, ended: EndedSpan) -> None: ...


class LeanSpan(trace.Span):
    """A recording span whose fields are what the span store writes, nothing more.

    Made by ``LeanTracer`` only; read by the span store's exporter after ``end``.
    """

    __slots__ = (
        "_processors",
        "_record_exception",
        "_set_status_on_exception",
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "name",
        "parent",
        "resource_service",
        "start_time",
        "status",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_time: int,
        resource_service: str,
        processors: Sequence[EndedSpanSink],
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.status = _UNSET
        self.start_time = start_time
        self.end_time: int | None = None
        self.resource_service = resource_service
        self._processors = processors
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.end_time is None:
            self.attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None and len(self.events) < MAX_EVENTS:
            self.events.append((name, timestamp or time_ns(), dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        return None  # the span store keeps no links

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides.
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An ``exception`` event with the SDK's attributes (type, message, stacktrace)."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            log.warning("span %r ended twice; the second end is ignored", self.name)
            return
        self.end_time = end = end_time or time_ns()
        context = self.context
        if not context[3] & TraceFlags.SAMPLED:
            return  # recorded, not sampled: exported nowhere, as the SDK's processors do
        parent = self.parent
        status = self.status
        events = self.events
        ended: EndedSpan = (
            context[0],
            context[1],
            None if parent is None else parent[1],
            self.name,
            _KIND_NAMES[self.kind],
            self.resource_service,
            self.start_time,
            end,
            _STATUS_NAMES[status.status_code],
            status.description,
            self.attributes,
            tuple(events) if events else None,
        )
        for processor in self._processors:
            processor.put(ended)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.end_time is None:
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()


class LeanTracer(trace.Tracer):
    """Makes ``LeanSpan``-s while its provider's spans all go to the store, else SDK spans."""

    def __init__(self, provider: LeanTracerProvider, sdk: SdkTracer) -> None:
        self._provider = provider
        self._sdk = sdk

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if not self._provider.lean_processors:
            return self._sdk.start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        return self._start(
            name,
            trace.get_current_span(context).get_span_context(),
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    def start_under(
        self,
        name: str,
        parent: SpanContext | None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
    ) -> trace.Span:
        """``start_span`` with the parent given rather than looked up in a ``Context``
        (None or invalid: a new trace), for the messaging middleware's every message."""
        if self._provider.lean_processors and self._provider.sampler is ALWAYS_ON:
            return self._start(name, parent, None, kind, attributes, (), None, True, True)
        context = Context()
        if parent is not None and parent.is_valid:
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent), context)
        return self.start_span(name, context, kind, attributes)

    def _start(
        self,
        name: str,
        parent: SpanContext | None,
        context: Context | None,
        kind: SpanKind,
        attributes: Attributes,
        links: Sequence[Link] | None,
        start_time: int | None,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> trace.Span:
        provider = self._provider
        # SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, trace_state,
        # is_valid): read by index, four property calls fewer on every span.
        if parent is not None and parent[5]:
            trace_id = parent[0]
            state = parent[4]
            random = bool(parent[3] & TraceFlags.RANDOM_TRACE_ID)
        else:
            parent = None
            trace_id = getrandbits(128) or 1
            state = _NO_STATE
            random = True
        sampled = True
        recorded = dict(attributes) if attributes else {}
        sampler = provider.sampler
        if sampler is not ALWAYS_ON:
            result = sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            state = result.trace_state or _NO_STATE
            if result.attributes:
                recorded.update(result.attributes)
            if result.decision is Decision.DROP:
                flags = _NOT_SAMPLED_RANDOM if random else _NOT_SAMPLED
                return trace.NonRecordingSpan(
                    SpanContext(trace_id, getrandbits(64) or 1, False, flags, state)
                )
        if sampled:
            flags = _SAMPLED_RANDOM if random else _SAMPLED
        else:
            flags = _NOT_SAMPLED_RANDOM if random else _NOT_SAMPLED
        # The tuple SpanContext is, built without re-checking ids that are valid by making.
        span_context = tuple.__new__(
            SpanContext, (trace_id, getrandbits(64) or 1, False, flags, state, True)
        )
        return LeanSpan(
            name,
            span_context,
            parent,
            kind,
            recorded,
            start_time or time_ns(),
            provider.service_name,
            provider.lean_processors,
            record_exception,
            set_status_on_exception,
        )

    # The SDK's own decorator: the result is also usable on async functions, as the SDK's is.
    @_agnosticcontextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class LeanTracerProvider(TracerProvider):
    """The SDK's ``TracerProvider``, making ``LeanSpan``-s while only the store listens.

    Add the span store's processor with ``add_span_processor(p, lean=True)``;
    any processor added without it (which expects the SDK's ``ReadableSpan``)
    switches every tracer of this provider back to the SDK's spans.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.lean_processors: tuple[EndedSpanSink, ...] = ()
        self._lean: list[EndedSpanSink] = []
        self._others = 0
        self._shut_down = False
        self.service_name = str(self.resource.attributes.get("service.name", "unknown"))

    def shutdown(self) -> None:
        """Shut the processors down, once: a processor several providers share counts
        their shutdowns (``BatchProcessor.share``), so a second one must not count."""
        if self._shut_down:
            return
        self._shut_down = True
        super().shutdown()

    def add_span_processor(self, span_processor: SpanProcessor, *, lean: bool = False) -> None:
        """Add a processor; ``lean``: it also takes ``EndedSpan``-s (``put``), as the
        span store's ``BatchProcessor`` does.

        Raises:
            ConfigurationError: ``lean`` for a processor without ``put``.
        """
        if lean:
            if not isinstance(span_processor, EndedSpanSink):
                raise ConfigurationError(
                    f"{type(span_processor).__name__} cannot take lean spans (it has no put); "
                    f"add it without lean=True"
                )
            self._lean.append(span_processor)
        else:
            self._others += 1
        super().add_span_processor(span_processor)
        self.lean_processors = () if self._others else tuple(self._lean)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        sdk = super().get_tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        if not isinstance(sdk, SdkTracer):
            return sdk  # the SDK is disabled: its no-op tracer
        return LeanTracer(self, sdk)
