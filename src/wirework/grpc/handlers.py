"""One endpoint served over gRPC: bytes in, handler call, bytes out, errors mapped once.

grpc is given no (de)serialisers: each behaviour receives the raw request
bytes and returns raw response bytes, so parsing and validation happen here,
where a bad message can be answered ``INVALID_ARGUMENT`` with the fields it
breaks (grpc's own deserialiser hook can only fail with ``INTERNAL``).

Errors, in one place (``_status``):

* a ``CallError``, or any ``WireworkError`` whose class names a gRPC code
  other than ``INTERNAL``, is answered with that code, its message as the
  details, and the type trailers of ``wirework.grpc.status``;
* anything else (a bug, or an internal error such as a missing provider) is
  logged with its traceback and answered ``INTERNAL`` with a generic message,
  so no stack detail or configuration leaks to callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc  # type: ignore[import-untyped]
from pydantic import BaseModel

from wirework.errors import CallError, WireworkError, error_name
from wirework.grpc.codec import InvalidMessageError, MessageCodec
from wirework.grpc.status import ERROR_TYPE_KEY, STATUS_DETAILS_KEY, status_details
from wirework.resilience.carriers import deadline_from_grpc
from wirework.resilience.deadline import deadline_scope
from wirework.service.endpoints import CallContext, Endpoint
from wirework.service.service import Service

log = logging.getLogger("wirework.grpc")

IDEMPOTENCY_KEY = "idempotency-key"


class Rpc:
    """The four gRPC behaviours of one endpoint; ``handler()`` picks its kind.

    Args:
        service: the service whose ``resolve`` provides the handler's dependencies.
        endpoint: the endpoint served.
        method: the full method path, ``/package.Service/Method`` (for logs and errors).
        request: codec of the request message (or of each streamed message).
        response: codec of the response message (or of each streamed message).
    """

    def __init__(
        self,
        service: Service,
        endpoint: Endpoint,
        method: str,
        request: MessageCodec[Any],
        response: MessageCodec[Any],
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self.method = method
        self.request = request
        self.response = response
        self._returns = endpoint.returns
        self._body = endpoint.body_name or ""
        self._unseen = CallContext(service.name, endpoint.name, "grpc")

    def handler(self, tracer: Any = None) -> Any:
        """The grpc ``RpcMethodHandler`` for the endpoint's streaming kind; with a
        ``tracer`` (``call_tracer``), each call runs inside a SERVER span."""
        kind = self.endpoint.streaming
        if kind in ("unary", "client"):
            unary = self.unary_unary if kind == "unary" else self.stream_unary
            if tracer is not None:
                unary = tracer.unary(self.method, unary)
            if kind == "unary":
                return grpc.unary_unary_rpc_method_handler(unary)
            return grpc.stream_unary_rpc_method_handler(unary)
        stream = self.unary_stream if kind == "server" else self.stream_stream
        if tracer is not None:
            stream = tracer.streaming(self.method, stream)
        if kind == "server":
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.stream_stream_rpc_method_handler(stream)

    # -- the four kinds --------------------------------------------------------

    async def unary_unary(self, data: bytes, context: Any) -> bytes:
        try:
            values = self.endpoint.split_request(self.request.decode(data))
            with self._call(context) as call:
                result = await self.endpoint.function(**self._arguments(values, call))
            return self._encode(result)
        except Exception as exc:
            failure = exc
        return await self._abort(context, failure)

    async def unary_stream(self, data: bytes, context: Any) -> AsyncIterator[bytes]:
        failure: Exception | None = None
        try:
            values = self.endpoint.split_request(self.request.decode(data))
            with self._call(context) as call:
                stream = self.endpoint.function(**self._arguments(values, call))
                async with contextlib.aclosing(stream):
                    async for item in stream:
                        yield self._encode(item)
        except Exception as exc:
            failure = exc
        if failure is not None:
            await self._abort(context, failure)

    async def stream_unary(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        try:
            values = {self._body: self._decoded(requests)}
            with self._call(context) as call:
                result = await self.endpoint.function(**self._arguments(values, call))
            return self._encode(result)
        except Exception as exc:
            failure = exc
        return await self._abort(context, failure)

    async def stream_stream(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        failure: Exception | None = None
        try:
            values = {self._body: self._decoded(requests)}
            with self._call(context) as call:
                stream = self.endpoint.function(**self._arguments(values, call))
                async with contextlib.aclosing(stream):
                    async for item in stream:
                        yield self._encode(item)
        except Exception as exc:
            failure = exc
        if failure is not None:
            await self._abort(context, failure)

    # -- pieces ------------------------------------------------------------------

    async def _decoded(self, requests: AsyncIterator[bytes]) -> AsyncIterator[BaseModel]:
        async for data in requests:
            yield self.request.decode(data)

    def _arguments(self, values: dict[str, Any], call: CallContext) -> dict[str, Any]:
        return self.endpoint.arguments(values, call, self.service.resolve)

    def _encode(self, result: Any) -> bytes:
        returns = self._returns
        if returns is None:
            return b""
        if not isinstance(result, returns):
            # A dict (or another model) is accepted as FastAPI accepts it; a
            # ValidationError here is the handler's bug: INTERNAL, and logged.
            result = returns.model_validate(result)
        return self.response.encode(result)

    def _call(self, context: Any) -> _CallScope:
        """The handler's ``CallContext``; entered, it makes the caller's deadline current."""
        remaining = context.time_remaining()
        if self.endpoint.context_name is None:
            # The handler never sees it: skip reading metadata and peer from grpc.
            return _CallScope(self._unseen, remaining)
        headers = _headers(context.invocation_metadata())
        call = CallContext(
            service_name=self.service.name,
            endpoint=self.endpoint.name,
            protocol="grpc",
            headers=headers,
            peer=context.peer(),
            deadline=None if remaining is None else asyncio.get_running_loop().time() + remaining,
            idempotency_key=headers.get(IDEMPOTENCY_KEY),
        )
        return _CallScope(call, remaining)

    async def _abort(self, context: Any, exc: Exception) -> NoReturn:
        code, message, trailers = self._status(exc)
        await context.abort(code, message, trailing_metadata=trailers)
        raise RuntimeError("grpc's context.abort returned instead of raising")  # pragma: no cover

    def _status(self, exc: Exception) -> tuple[Any, str, tuple[tuple[str, Any], ...]]:
        if isinstance(exc, WireworkError) and (
            isinstance(exc, CallError) or exc.grpc_code != "INTERNAL"
        ):
            code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.UNKNOWN)
            message = str(exc) or type(exc).__name__
            kind = error_name(type(exc))
            if not isinstance(exc, CallError):
                log.warning("%s answered %s: %s", self.method, code.name, message)
            violations = exc.violations if isinstance(exc, InvalidMessageError) else ()
            details = status_details(code.value[0], message, kind, type(exc), violations)
            return code, message, ((ERROR_TYPE_KEY, kind), (STATUS_DETAILS_KEY, details))
        log.error("%s failed; answering INTERNAL", self.method, exc_info=exc)
        return (
            grpc.StatusCode.INTERNAL,
            f"internal error in {self.method}; the server's log has the details",
            (),
        )


class _CallScope:
    """``with``: the call's context, and its deadline current (``current_deadline()``)
    for whatever the handler calls downstream. A plain class, not a generator-based
    context manager: this runs on every call."""

    __slots__ = ("_remaining", "_scope", "call")

    def __init__(self, call: CallContext, remaining: float | None) -> None:
        self.call = call
        self._remaining = remaining
        self._scope: contextlib.AbstractContextManager[object] | None = None

    def __enter__(self) -> CallContext:
        if self._remaining is not None:
            self._scope = deadline_scope(deadline_from_grpc(self._remaining))
            self._scope.__enter__()
        return self.call

    def __exit__(self, *exc_info: object) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)


def call_tracer(provider: Any = None, **where: Any) -> Any:
    """The spans of gRPC calls (``wirework.tracing.grpc_calls.GrpcCallTracer``), or None
    when tracing is not configured, so an untraced server or client wraps nothing.

    ``provider`` None means OpenTelemetry's global provider, if one was set; if
    nothing imported OpenTelemetry, nothing configured it, and it is not imported here.
    """
    if provider is None and "opentelemetry.trace" not in sys.modules:
        return None
    from wirework.tracing.grpc_calls import GrpcCallTracer

    return GrpcCallTracer.configured(provider, **where)


def _headers(metadata: Any) -> dict[str, str]:
    """gRPC metadata as lower-case headers; binary (``-bin``) entries are left out."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        if key.endswith("-bin") or not isinstance(value, str):
            continue
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers
