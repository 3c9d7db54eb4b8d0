"""Spans for saga steps: one INTERNAL span per attempt of a step or of a compensation.

A saga outlives the call that started it, and may be driven by another
process after a crash, so its steps cannot be children of a live span. The
saga keeps the W3C trace context current when it was started
(``current_trace_context``, recorded by ``Orchestrator.start``); each
attempt's span ``saga <saga> <step>`` (``saga <saga> <step> compensate``)
has that context as its parent, whichever orchestrator runs it. The span is
current while the step runs, so what the step publishes or calls becomes its
child: one order, one trace.

Attributes: ``wirework.saga_id`` (indexed by the span store), ``wirework.saga``,
``wirework.step``, ``wirework.attempt``, ``wirework.compensating`` and
``wirework.outcome`` (``success``, ``retry``, ``failed``, ``unknown`` for an
attempt an orchestrator died in, ``cancelled``). A failure is recorded as an
exception event and status ERROR.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from wirework.tracing.messaging import ATTEMPT_ATTRIBUTE, OUTCOME_ATTRIBUTE, TRACER_NAME
from wirework.tracing.propagation import (
    TRACEPARENT,
    TRACESTATE,
    format_traceparent,
    format_tracestate,
    remote_parent,
)
from wirework.tracing.span_store import SAGA_ATTRIBUTE

SAGA_NAME_ATTRIBUTE = "wirework.saga"
STEP_ATTRIBUTE = "wirework.step"
COMPENSATING_ATTRIBUTE = "wirework.compensating"

_STATUS_TEXT = 200


def current_trace_context() -> dict[str, str]:
    """The current span as ``traceparent`` (and ``tracestate``); empty outside any span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    found = {TRACEPARENT: format_traceparent(span_context)}
    state = format_tracestate(span_context.trace_state) if span_context.trace_state else ""
    if state:
        found[TRACESTATE] = state
    return found


def saga_context(traceparent: str | None, tracestate: str | None) -> Context:
    """The parent of a saga's step spans: its recorded context (none: a new trace)."""
    parent = None
    if traceparent:
        parent = remote_parent(traceparent, lambda: [tracestate] if tracestate else [])
    if parent is None:
        # An empty context, not the current one: the orchestrator's own task may run
        # inside an unrelated span, and a saga started outside any trace gets its own.
        return Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), Context())


class AttemptSpan:
    """The span of one attempt: say how it ended with ``succeeded`` or ``failed``."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.outcome: str | None = None

    def succeeded(self) -> None:
        self._end_as("success")

    def failed(self, error: BaseException, *, final: bool) -> None:
        """The attempt raised; ``final``: the step (or compensation) gives up after it."""
        self._end_as("failed" if final else "retry")
        self.span.record_exception(error)
        text = f"{type(error).__name__}: {error}"
        self.span.set_status(Status(StatusCode.ERROR, text[:_STATUS_TEXT]))

    def _end_as(self, outcome: str) -> None:
        self.outcome = outcome
        self.span.set_attribute(OUTCOME_ATTRIBUTE, outcome)


class SagaSpans:
    """Makes the spans of saga step attempts from a tracer provider (None: the global one)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)

    @contextmanager
    def attempt(
        self,
        *,
        saga_id: str,
        saga: str,
        step: str,
        attempt: int,
        compensating: bool,
        traceparent: str | None,
        tracestate: str | None,
    ) -> Iterator[AttemptSpan]:
        """The span of one attempt, current inside the block.

        Left without an outcome (a cancellation: the orchestrator stopped or
        lost the saga's lease), it ends as ``cancelled``.
        """
        span = self.tracer.start_span(
            _name(saga, step, compensating),
            context=saga_context(traceparent, tracestate),
            kind=SpanKind.INTERNAL,
            attributes=_attributes(saga_id, saga, step, attempt, compensating),
        )
        ending = AttemptSpan(span)
        token = attach(trace.set_span_in_context(span))
        try:
            yield ending
        finally:
            detach(token)
            if ending.outcome is None:
                span.set_attribute(OUTCOME_ATTRIBUTE, "cancelled")
            span.end()

    def lost(
        self,
        *,
        saga_id: str,
        saga: str,
        step: str,
        attempt: int,
        compensating: bool,
        traceparent: str | None,
        tracestate: str | None,
        reason: str,
    ) -> None:
        """An attempt whose orchestrator died during it: its span was never exported, so
        an empty one says so (outcome ``unknown``, status ERROR) where it belongs."""
        attributes = _attributes(saga_id, saga, step, attempt, compensating)
        attributes[OUTCOME_ATTRIBUTE] = "unknown"
        span = self.tracer.start_span(
            _name(saga, step, compensating),
            context=saga_context(traceparent, tracestate),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        span.set_status(Status(StatusCode.ERROR, reason[:_STATUS_TEXT]))
        span.end()


def _name(saga: str, step: str, compensating: bool) -> str:
    return f"saga {saga} {step}" + (" compensate" if compensating else "")


def _attributes(
    saga_id: str, saga: str, step: str, attempt: int, compensating: bool
) -> dict[str, str | int | bool]:
    return {
        SAGA_ATTRIBUTE: saga_id,
        SAGA_NAME_ATTRIBUTE: saga,
        STEP_ATTRIBUTE: step,
        ATTEMPT_ATTRIBUTE: attempt,
        COMPENSATING_ATTRIBUTE: compensating,
    }
