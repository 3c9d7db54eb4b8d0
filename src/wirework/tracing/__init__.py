"""Tracing: OpenTelemetry spans for every hop, W3C Trace Context (and B3) propagation,
an embedded span store, and OTLP export to the user's collector.

Typical use, once per process before the services start::

    tracing = configure_tracing("orders")
    instrument(orders_service)

Importing this package imports the OpenTelemetry SDK (the ``tracing`` extra);
``import wirework`` does not import it.
"""

from wirework.tracing.calls import client_span as client_span
from wirework.tracing.calls import record_grpc_status as record_grpc_status
from wirework.tracing.calls import record_http_status as record_http_status
from wirework.tracing.calls import server_span as server_span
from wirework.tracing.logs import JsonFormatter as JsonFormatter
from wirework.tracing.logs import TraceContextFilter as TraceContextFilter
from wirework.tracing.logs import configure_logging as configure_logging
from wirework.tracing.messaging import Instrumentation as Instrumentation
from wirework.tracing.messaging import envelope_context as envelope_context
from wirework.tracing.messaging import instrument as instrument
from wirework.tracing.messaging import with_trace_context as with_trace_context
from wirework.tracing.propagation import B3Propagator as B3Propagator
from wirework.tracing.propagation import Propagation as Propagation
from wirework.tracing.propagation import TraceContextPropagator as TraceContextPropagator
from wirework.tracing.propagation import build_propagation as build_propagation
from wirework.tracing.propagation import extract as extract
from wirework.tracing.propagation import inject as inject
from wirework.tracing.setup import Tracing as Tracing
from wirework.tracing.setup import configure_tracing as configure_tracing
from wirework.tracing.span_store import SpanRecord as SpanRecord
from wirework.tracing.span_store import SpanStore as SpanStore
from wirework.tracing.span_store import TraceSummary as TraceSummary

__all__ = [
    "B3Propagator",
    "Instrumentation",
    "JsonFormatter",
    "Propagation",
    "SpanRecord",
    "SpanStore",
    "TraceContextFilter",
    "TraceContextPropagator",
    "TraceSummary",
    "Tracing",
    "build_propagation",
    "client_span",
    "configure_logging",
    "configure_tracing",
    "envelope_context",
    "extract",
    "inject",
    "instrument",
    "record_grpc_status",
    "record_http_status",
    "server_span",
    "with_trace_context",
]
