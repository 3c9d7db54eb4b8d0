"""``GrpcClient``: call a service's endpoints over gRPC, typed by the handlers themselves.

::

    async with GrpcClient(orders, registry=Registry.from_env()) as client:
        order = await client.call(get_order, order_id=order_id, timeout=2)   # -> Order
        async for line in client.stream(watch, order_id=order_id):           # server stream
            ...

The client derives the same ``.proto`` as the server from the same
definition, so it needs no generated code. Arguments are validated locally
through the endpoint's models before anything is sent (a bad call fails
here, with the fields named, not after a round trip). Each address gets one
``grpc.aio`` channel (HTTP/2 multiplexes the calls); with a registry, calls
turn round-robin across the service's ``grpc://`` addresses.

Deadlines: ``timeout=`` per call, tightened by the deadline of the call being
handled (``wirework.resilience.current_deadline()``), so a downstream call
never outlives its caller. Failures raise ``WireworkError``s: the server's
own class when it named one (``rebuild_error``), else the class of the
status code, else ``RemoteError`` (``wirework.grpc.status``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, overload
from urllib.parse import urlsplit

import grpc  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError

from wirework.errors import BadRequestError, ConfigurationError, RemoteError, WireworkError
from wirework.grpc.codec import Codec, InvalidMessageError, MessageCodec
from wirework.grpc.handlers import IDEMPOTENCY_KEY, call_tracer
from wirework.grpc.proto import RpcSpec, derive_endpoints
from wirework.grpc.server import MiB
from wirework.grpc.status import error_from_status
from wirework.registry import Registry
from wirework.resilience.carriers import grpc_timeout
from wirework.resilience.deadline import Deadline, current_deadline, tighter
from wirework.resilience.pipeline import Policy
from wirework.service.endpoints import Endpoint
from wirework.service.service import Service

R = TypeVar("R")

Metadata = Mapping[str, str]


class GrpcClient:
    """A typed gRPC client for one service.

    Args:
        service: the ``Service`` (its name and endpoints are used), or the
            service's name when ``endpoints`` are given.
        endpoints: the endpoints to call, when ``service`` is a name (a
            client that imports only the contract, not the service).
        address: ``host:port`` (or ``grpc://host:port``), or several to turn
            round-robin across.
        registry: where to find addresses instead (``Registry.from_env()`` is
            used when neither ``address`` nor ``registry`` is given).
        max_send_message_bytes: a larger request fails locally with
            ``RESOURCE_EXHAUSTED`` (4 MiB, as the server's receive limit).
        max_receive_message_bytes: a larger response fails the call.
        policy: resilience policies (a ``Pipeline`` from ``wirework.resilience``)
            around every unary and client-streaming call. Each attempt goes to
            the next address; a call is retried only when the endpoint is
            idempotent (GET, PUT, DELETE) or carries ``idempotency_key``, and a
            client stream never is. Server streams are not wrapped.
        tracer_provider: trace each attempt with this OpenTelemetry provider; None
            uses the global one if tracing was configured before this client was
            built, else traces nothing.

    Raises:
        ConfigurationError: no endpoints, a model without protobuf form, or
            both ``address`` and ``registry``.
    """

    def __init__(
        self,
        service: Service | str,
        endpoints: Iterable[Endpoint] | None = None,
        *,
        address: str | Iterable[str] | None = None,
        registry: Registry | None = None,
        max_send_message_bytes: int = 4 * MiB,
        max_receive_message_bytes: int = 4 * MiB,
        policy: Policy | None = None,
        tracer_provider: Any = None,
    ) -> None:
        if isinstance(service, Service):
            name, chosen = service.name, list(endpoints or service.endpoints)
        else:
            if endpoints is None:
                raise ConfigurationError(
                    f"GrpcClient({service!r}) needs the service's endpoints: pass the "
                    f"Service itself, or endpoints=service.endpoints"
                )
            name, chosen = service, list(endpoints)
        if address is not None and registry is not None:
            raise ConfigurationError("pass GrpcClient either address= or registry=, not both")
        self.service_name = name
        proto = derive_endpoints(name, chosen)
        codec = Codec(proto)
        self._path = proto.full_name(proto.service)
        self._rpcs: dict[str, _Call] = {}
        for rpc in proto.rpcs:
            call = _Call(rpc, f"/{self._path}/{rpc.endpoint.name}", codec)
            self._rpcs[rpc.endpoint.name] = call
            self._rpcs.setdefault(getattr(rpc.endpoint.function, "__name__", ""), call)
        self._functions: dict[Callable[..., Any], str] = {
            rpc.endpoint.function: rpc.endpoint.name for rpc in proto.rpcs
        }
        addresses = [address] if isinstance(address, str) else list(address or ())
        self._addresses = [_target(item) for item in addresses]
        self._turn = 0
        if registry is None and not addresses:
            registry = Registry.from_env()
        self._registry = registry
        self._options = [
            ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.max_receive_message_length", max_receive_message_bytes),
        ]
        self._channels: dict[str, Any] = {}
        self._policy = policy
        self._tracer = call_tracer(tracer_provider)
        self._target = ""  # the address the last _channel() picked, for the span

    # -- calling ------------------------------------------------------------------

    @overload
    async def call(
        self,
        endpoint: Callable[..., Coroutine[Any, Any, R]],
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> R: ...

    @overload
    async def call(
        self,
        endpoint: str,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> Any: ...

    async def call(
        self,
        endpoint: Callable[..., Any] | str,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> Any:
        """Call a unary or client-streaming endpoint and return its typed response.

        ``endpoint`` is the handler function or its gRPC (or Python) name;
        ``arguments`` are the handler's parameters by name. For a client
        stream, pass the body parameter an iterable or async iterable of models.

        Raises:
            BadRequestError: the arguments break the endpoint's models (nothing was sent).
            WireworkError: the call failed (see the module docstring for which class).
        """
        rpc = self._rpc(endpoint, ("unary", "client"))
        if rpc.kind == "unary":
            request = rpc.request.encode(rpc.validate(arguments))

            async def attempt() -> Any:
                options = self._call_options(timeout, metadata, idempotency_key)
                method = rpc.multicallable(self._channel())
                try:
                    if self._tracer is None:
                        data = await method(request, **options)
                    else:
                        with self._tracer.client(rpc.method, self._target, options["metadata"]):
                            data = await method(request, **options)
                except grpc.aio.AioRpcError as exc:
                    raise _error(exc) from exc
                return rpc.decode(data)

            if self._policy is None:
                return await attempt()
            return await self._policy.call(
                attempt,
                idempotent=rpc.rpc.endpoint.idempotent,
                idempotency_key=idempotency_key,
            )
        requests = _Requests(rpc, arguments)

        async def send_stream() -> Any:
            options = self._call_options(timeout, metadata, idempotency_key)
            method = rpc.multicallable(self._channel())
            try:
                if self._tracer is None:
                    data = await method(requests.encoded(), **options)
                else:
                    with self._tracer.client(rpc.method, self._target, options["metadata"]):
                        data = await method(requests.encoded(), **options)
            except grpc.aio.AioRpcError as exc:
                raise requests.failure or _error(exc) from exc
            except asyncio.CancelledError:
                raise requests.cancelled_by() from None
            return rpc.decode(data)

        if self._policy is None:
            return await send_stream()
        # A stream already read cannot be sent again: never retried, but the
        # timeout, breaker and bulkhead still apply.
        return await self._policy.call(send_stream)

    @overload
    def stream(
        self,
        endpoint: Callable[..., AsyncIterator[R]],
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> AsyncIterator[R]: ...

    @overload
    def stream(
        self,
        endpoint: str,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> AsyncIterator[Any]: ...

    async def stream(
        self,
        endpoint: Callable[..., Any] | str,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> AsyncIterator[Any]:
        """Call a server-streaming or bidirectional endpoint; iterate its typed responses.

        Leaving the loop early cancels the call. For a bidirectional stream,
        pass the body parameter an iterable or async iterable of models.

        Raises:
            BadRequestError: the arguments break the endpoint's models (nothing was sent).
            WireworkError: the call failed, before or between responses.
        """
        rpc = self._rpc(endpoint, ("server", "bidi"))
        options = self._call_options(timeout, metadata, idempotency_key)
        method = rpc.multicallable(self._channel())
        requests: _Requests | None = None
        request = b""
        if rpc.kind == "server":
            request = rpc.request.encode(rpc.validate(arguments))
        else:
            requests = _Requests(rpc, arguments)
        span = None
        if self._tracer is not None:
            pairs = options["metadata"]
            span = self._tracer.client(rpc.method, self._target, pairs, current=False)
            span.__enter__()
        call = method(request if requests is None else requests.encoded(), **options)
        failure: BaseException | None = None
        try:
            async for data in call:
                yield rpc.decode(data)
        except grpc.aio.AioRpcError as exc:
            failure = exc
            local = requests.failure if requests is not None else None
            raise local or _error(exc) from exc
        except asyncio.CancelledError as exc:
            failure = exc
            if requests is None:
                raise
            raise requests.cancelled_by() from None
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call.cancel()
            if span is not None:
                span.__exit__(None if failure is None else type(failure), failure, None)

    # -- channels -------------------------------------------------------------------

    def _rpc(self, endpoint: Callable[..., Any] | str, kinds: tuple[str, ...]) -> _Call:
        name = endpoint if isinstance(endpoint, str) else self._functions.get(endpoint, "")
        rpc = self._rpcs.get(name)
        if rpc is None:
            shown = endpoint if isinstance(endpoint, str) else getattr(endpoint, "__qualname__", "")
            raise ConfigurationError(
                f"service {self.service_name!r} has no gRPC endpoint {shown!r}; it has "
                f"{sorted({call.rpc.endpoint.name for call in self._rpcs.values()})}"
            )
        if rpc.kind not in kinds:
            use = "stream()" if rpc.kind in ("server", "bidi") else "call()"
            raise ConfigurationError(
                f"{rpc.rpc.endpoint.name} of service {self.service_name!r} is a "
                f"{rpc.kind}-streaming endpoint; call it with {use}"
            )
        return rpc

    @staticmethod
    def _call_options(
        timeout: float | None, metadata: Metadata | None, idempotency_key: str | None
    ) -> dict[str, Any]:
        own = None if timeout is None else Deadline.after(timeout, source=f"timeout={timeout:g}")
        pairs = [(key.lower(), value) for key, value in (metadata or {}).items()]
        if idempotency_key is not None:
            pairs.append((IDEMPOTENCY_KEY, idempotency_key))
        return {"timeout": grpc_timeout(tighter(current_deadline(), own)), "metadata": pairs}

    def _channel(self) -> Any:
        if self._addresses:
            target = self._addresses[self._turn % len(self._addresses)]
            self._turn += 1
            self._target = target
        elif self._registry is not None:
            target = self._target = _target(self._registry.next(self.service_name, "grpc"))
        else:  # pragma: no cover - __init__ sets one of the two
            raise ConfigurationError(f"GrpcClient({self.service_name!r}) has no address")
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(
                target, options=self._options
            )
        return channel

    async def aclose(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Call:
    """One rpc as the client sees it: its codecs, validation and grpc multicallables."""

    def __init__(self, rpc: RpcSpec, method: str, codec: Codec) -> None:
        self.rpc = rpc
        self.kind = rpc.streaming
        self.method = method
        self.request: MessageCodec[Any] = codec.codec(rpc.request)
        self.response: MessageCodec[Any] = codec.codec(rpc.response)
        endpoint = rpc.endpoint
        self._names = {param.name for param in endpoint.params}
        if endpoint.body_name is not None:
            self._names.add(endpoint.body_name)
        self._multicallables: dict[int, Any] = {}

    def validate(self, arguments: Mapping[str, Any]) -> BaseModel:
        """The request message's model from the handler's arguments, validated here."""
        endpoint = self.rpc.endpoint
        unknown = sorted(set(arguments) - self._names)
        if unknown:
            raise BadRequestError(
                f"{endpoint.name} takes {sorted(self._names) or 'no arguments'}; "
                f"{unknown} are not among them"
            )
        model = endpoint.request_model
        try:
            if endpoint.body_is_request and endpoint.body_name is not None:
                body = arguments.get(endpoint.body_name)
                return body if isinstance(body, model) else model.model_validate(body)
            return model.model_validate(dict(arguments))
        except ValidationError as exc:
            raise InvalidMessageError(f"arguments for {endpoint.name}", exc) from None

    def item(self, value: Any) -> BaseModel:
        """One message of a client stream, validated."""
        model = self.rpc.endpoint.request_model
        try:
            return value if isinstance(value, model) else model.model_validate(value)
        except ValidationError as exc:
            raise InvalidMessageError(f"arguments for {self.rpc.endpoint.name}", exc) from None

    def decode(self, data: bytes) -> Any:
        try:
            return self.response.decode(data)
        except BadRequestError as exc:
            raise RemoteError(
                "wirework.grpc.InvalidResponse",
                f"{self.method} answered a message its contract does not allow: {exc}",
                reason="invalid_response",
            ) from exc

    def multicallable(self, channel: Any) -> Any:
        found = self._multicallables.get(id(channel))
        if found is None:
            factory = {
                "unary": channel.unary_unary,
                "server": channel.unary_stream,
                "client": channel.stream_unary,
                "bidi": channel.stream_stream,
            }[self.kind]
            found = self._multicallables[id(channel)] = factory(
                self.method, _registered_method=True
            )
        return found


class _Requests:
    """A client stream's messages, validated and encoded as grpc pulls them.

    grpc consumes the request iterator in a task of its own and reports an
    exception there only as a cancelled call; the local error is kept here so
    the caller gets the real reason (``failure``).
    """

    def __init__(self, rpc: _Call, arguments: Mapping[str, Any]) -> None:
        body = rpc.rpc.endpoint.body_name or ""
        unknown = sorted(set(arguments) - {body})
        if unknown or body not in arguments:
            raise BadRequestError(
                f"{rpc.rpc.endpoint.name} takes one argument, {body!r}: an iterable or async "
                f"iterable of {rpc.rpc.endpoint.request_model.__name__}"
            )
        self.rpc = rpc
        self.source = arguments[body]
        self.failure: Exception | None = None

    def cancelled_by(self) -> BaseException:
        """What to raise when grpc cancelled the call: our local error, unless the
        caller's own task is being cancelled (then the cancellation goes on)."""
        task = asyncio.current_task()
        if self.failure is not None and (task is None or not task.cancelling()):
            return self.failure
        return asyncio.CancelledError()

    async def encoded(self) -> AsyncIterator[bytes]:
        try:
            if isinstance(self.source, AsyncIterable):
                async for value in self.source:
                    yield self.rpc.request.encode(self.rpc.item(value))
            else:
                for value in self.source:
                    yield self.rpc.request.encode(self.rpc.item(value))
        except Exception as exc:  # the caller's own iterator may fail any way
            self.failure = exc
            raise


def _target(address: str) -> str:
    """``grpc://host:port`` or ``host:port`` → what grpc dials (``host:port``)."""
    if "://" not in address:
        return address
    parts = urlsplit(address)
    if parts.scheme != "grpc":
        raise ConfigurationError(
            f"address {address!r}: this client speaks plaintext gRPC (grpc://host:port); "
            f"TLS (grpcs://) is not supported yet"
        )
    return parts.netloc


def _error(exc: Any) -> WireworkError:
    return error_from_status(exc.code().name, exc.details() or "", exc.trailing_metadata())
