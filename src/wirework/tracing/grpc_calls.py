"""Spans around gRPC calls: a SERVER span per call served, a CLIENT span per attempt made.

The gRPC binding asks for a ``GrpcCallTracer`` once, when a server or client
is built, and gets None when tracing is not configured: then it wraps
nothing and a call costs exactly what it did before. With one, the server
reads the caller's context from the metadata (a bad ``traceparent`` starts
a new trace and the call goes on) and the client writes its span into the
metadata of each attempt, so a retry carries a new parent id.

Names and attributes follow the OpenTelemetry RPC conventions: the span is
``package.Service/Method`` with ``rpc.system=grpc``, ``rpc.service``,
``rpc.method``, ``rpc.grpc.status_code``, ``server.address`` and
``server.port``. Which codes fail a span is ``record_grpc_status``'s rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from wirework.tracing.calls import record_grpc_status
from wirework.tracing.messaging import TRACER_NAME
from wirework.tracing.propagation import extract, inject

#: gRPC status code values by name (the wire numbers, stable across versions).
CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
_NAMES = {value: name for name, value in CODES.items()}
_STATUS_TEXT = 200

Unary = Callable[[Any, Any], Awaitable[Any]]
Streaming = Callable[[Any, Any], AsyncGenerator[Any, None]]


def configured_provider(provider: TracerProvider | None) -> TracerProvider | None:
    """``provider``, else OpenTelemetry's global one if something set it, else None."""
    if provider is not None:
        return provider
    found = trace.get_tracer_provider()
    return None if isinstance(found, trace.ProxyTracerProvider) else found


def code_of(code: Any) -> tuple[str, int]:
    """A status code as grpc gives it (``grpc.StatusCode``, a number, a name) → (name, value)."""
    if isinstance(code, int):
        return _NAMES.get(code, "UNKNOWN"), code
    if isinstance(code, str):
        return code, CODES.get(code, 2)
    name = getattr(code, "name", "UNKNOWN")
    return name, CODES.get(name, 2)


def split_method(method: str) -> tuple[str, str]:
    """``/package.Service/Method`` → (``package.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class GrpcCallTracer:
    """Makes the spans of one gRPC server's or client's calls.

    Args:
        provider: the tracer provider (``configure_tracing(...).provider``).
        host, port: ``server.address``/``server.port`` of the spans of a server
            (the client gives each attempt's target instead); ``port`` may be
            set once the server has bound it.
    """

    def __init__(
        self, provider: TracerProvider, *, host: str | None = None, port: int | None = None
    ) -> None:
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.host = host
        self.port = port

    @classmethod
    def configured(cls, provider: TracerProvider | None, **where: Any) -> GrpcCallTracer | None:
        """A tracer for ``provider`` (or the global one), None when tracing is not set up."""
        found = configured_provider(provider)
        return None if found is None else cls(found, **where)

    # -- server ----------------------------------------------------------------

    def _server_attributes(self, method: str) -> dict[str, Any]:
        service, name = split_method(method)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }
        if self.host is not None:
            attributes["server.address"] = self.host
        if self.port is not None:
            attributes["server.port"] = self.port
        return attributes

    def unary(self, method: str, behaviour: Unary) -> Unary:
        """``behaviour`` (unary or client-streaming) inside a SERVER span per call."""
        name = method.lstrip("/")

        async def traced(request: Any, context: Any) -> Any:
            with self.tracer.start_as_current_span(
                name,
                context=extract(context.invocation_metadata() or ()),
                kind=SpanKind.SERVER,
                attributes=self._server_attributes(method),
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    result = await behaviour(request, context)
                except BaseException as exc:
                    _served(span, context, exc)
                    raise
                _served(span, context, None)
                return result

        return traced

    def streaming(self, method: str, behaviour: Streaming) -> Streaming:
        """``behaviour`` (server- or bidirectional-streaming) inside a SERVER span per call."""
        name = method.lstrip("/")

        async def traced(request: Any, context: Any) -> AsyncGenerator[Any, None]:
            span = self.tracer.start_span(
                name,
                context=extract(context.invocation_metadata() or ()),
                kind=SpanKind.SERVER,
                attributes=self._server_attributes(method),
            )
            # The span is current only while the handler runs, one step at a time: a
            # context attached across a yield would be detached in another context.
            stream = behaviour(request, context)
            try:
                while True:
                    with trace.use_span(
                        span, record_exception=False, set_status_on_exception=False
                    ):
                        try:
                            item = await anext(stream)
                        except StopAsyncIteration:
                            break
                    yield item
            except BaseException as exc:
                _served(span, context, exc)
                raise
            else:
                _served(span, context, None)
            finally:
                await stream.aclose()
                span.end()

        return traced

    # -- client ----------------------------------------------------------------

    def client(
        self, method: str, target: str, metadata: list[tuple[str, str]], *, current: bool = True
    ) -> ClientSpan:
        """``with``: one attempt's CLIENT span, written into ``metadata`` (a list of pairs).

        ``current=False`` for a stream the caller iterates: its span is not made
        current (it would stay current in the caller's code between messages).
        """
        return ClientSpan(self, method, target, metadata, current=current)


class ClientSpan:
    """One attempt's CLIENT span; a plain class (not a generator) as it runs per call.

    Leaving it with grpc's ``AioRpcError`` (anything with ``code()``) records
    that code; any other exception records ``UNKNOWN`` (``CANCELLED`` for a
    cancellation) and the exception.
    """

    __slots__ = ("_current", "_metadata", "_method", "_owner", "_scope", "_target", "span")

    def __init__(
        self,
        owner: GrpcCallTracer,
        method: str,
        target: str,
        metadata: list[tuple[str, str]],
        *,
        current: bool = True,
    ) -> None:
        self._owner = owner
        self._current = current
        self._method = method
        self._target = target
        self._metadata = metadata
        self._scope: Any = None
        self.span: trace.Span = trace.INVALID_SPAN

    def __enter__(self) -> trace.Span:
        service, name = split_method(self._method)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }
        host, _, port = self._target.rpartition(":")
        if host and port.isdigit():
            attributes["server.address"] = host.strip("[]")
            attributes["server.port"] = int(port)
        else:
            attributes["server.address"] = self._target
        tracer = self._owner.tracer
        name = self._method.lstrip("/")
        headers: dict[str, str] = {}
        if self._current:
            self._scope = tracer.start_as_current_span(
                name,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            )
            self.span = self._scope.__enter__()
            inject(headers)
        else:
            self.span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
            inject(headers, context=trace.set_span_in_context(self.span))
        self._metadata.extend(headers.items())
        return self.span

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        span = self.span
        if exc is None:
            record_grpc_status(span, "OK", 0, server=False)
        else:
            code = getattr(exc, "code", None)
            if callable(code):
                name, value = code_of(code())
            else:
                # Leaving a stream early (GeneratorExit) cancels the call too.
                cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
                name, value = ("CANCELLED", 1) if cancelled else ("UNKNOWN", 2)
                if not cancelled:
                    span.record_exception(exc)
            record_grpc_status(span, name, value, server=False)
            details = getattr(exc, "details", None)
            text = details() if callable(details) else None
            if text and name != "OK":
                span.set_status(Status(StatusCode.ERROR, f"gRPC {name}: {text}"[:_STATUS_TEXT]))
        if self._scope is not None:
            self._scope.__exit__(kind, exc, traceback)
        else:
            span.end()


def _served(span: trace.Span, context: Any, exc: BaseException | None) -> None:
    """Record how a served call ended: the code the handler aborted with, else OK,
    UNKNOWN for an exception that escaped, CANCELLED for a cancelled call."""
    code = _context_code(context)
    if code is None:
        if exc is None:
            code = ("OK", 0)
        elif isinstance(exc, asyncio.CancelledError):
            code = ("CANCELLED", 1)
        else:
            code = ("UNKNOWN", 2)
            span.record_exception(exc)
    record_grpc_status(span, code[0], code[1], server=True)


def _context_code(context: Any) -> tuple[str, int] | None:
    try:
        code = context.code()
    except Exception:  # an older grpc without code(): judge by the exception alone
        return None
    return None if code is None else code_of(code)
