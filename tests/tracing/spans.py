"""Finished spans made by hand, with the times a test needs (no clock to wait on)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

SECOND = 1_000_000_000


def finished(
    trace_id: int,
    span_id: int,
    *,
    end_ns: int,
    duration_ns: int = 1_000_000,
    parent_id: int | None = None,
    name: str = "work",
    service: str = "svc",
    error: bool = False,
    attributes: dict[str, Any] | None = None,
) -> ReadableSpan:
    def context(span: int) -> SpanContext:
        return SpanContext(trace_id, span, is_remote=False, trace_flags=TraceFlags(1))

    return ReadableSpan(
        name=name,
        context=context(span_id),
        parent=context(parent_id) if parent_id is not None else None,
        resource=Resource({"service.name": service}),
        attributes=attributes or {},
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, "boom") if error else Status(StatusCode.UNSET),
        start_time=end_ns - duration_ns,
        end_time=end_ns,
    )
