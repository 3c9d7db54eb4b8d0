"""``GrpcServer``: services' endpoints on one ``grpc.aio`` server, with safe limits.

::

    async with GrpcServer(orders, host="0.0.0.0", port=50051) as server:
        await server.wait_closed()

Each service is one proto ``service`` (``wirework.orders.Orders``) whose
methods are registered with ``add_registered_method_handlers``, plus the
standard ``grpc.health.v1.Health``. Limits follow RELIABILITY.md §3.7: a
message over ``max_receive_message_bytes`` (4 MiB, gRPC's own default) is
refused by grpc's core with ``RESOURCE_EXHAUSTED`` before our code sees it,
so an oversized request costs its bytes on the socket and nothing more.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import grpc  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field

from wirework.errors import ConfigurationError
from wirework.grpc.codec import Codec
from wirework.grpc.handlers import Rpc, call_tracer
from wirework.grpc.health import HEALTH_SERVICE, NOT_SERVING, SERVING, Health
from wirework.grpc.proto import ProtoFile, derive
from wirework.service.service import Service

MiB = 1024 * 1024


class GrpcLimits(BaseModel):
    """What one gRPC server accepts (RELIABILITY.md §3.7); all on by default.

    Attributes:
        max_receive_message_bytes: a larger request message is refused with
            ``RESOURCE_EXHAUSTED`` (gRPC's default, 4 MiB).
        max_send_message_bytes: a larger response fails the call with
            ``RESOURCE_EXHAUSTED`` instead of being sent.
        max_concurrent_streams: HTTP/2 streams (calls) one connection may have open.
        max_concurrent_rpcs: calls in progress across the server; more are
            refused with ``RESOURCE_EXHAUSTED`` (None: no server-wide limit).
        max_metadata_bytes: the largest metadata (header) block accepted.
        keepalive_time: seconds between the server's keepalive pings on an idle connection.
        keepalive_timeout: seconds to wait for a ping's answer before closing the connection.
        min_ping_interval: a client pinging more often than this is sent GOAWAY.
        max_connection_idle: seconds after which a connection with no call is closed.
        reuse_port: share the port with other processes (``wirework run --workers``);
            off by default, so a second server on a port in use is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_receive_message_bytes: int = Field(4 * MiB, gt=0)
    max_send_message_bytes: int = Field(4 * MiB, gt=0)
    max_concurrent_streams: int = Field(100, gt=0)
    max_concurrent_rpcs: int | None = Field(None, gt=0)
    max_metadata_bytes: int = Field(16 * 1024, gt=0)
    keepalive_time: float = Field(7200.0, gt=0)
    keepalive_timeout: float = Field(20.0, gt=0)
    min_ping_interval: float = Field(300.0, gt=0)
    max_connection_idle: float | None = Field(None, gt=0)
    reuse_port: bool = False

    def options(self) -> list[tuple[str, int]]:
        """The grpc channel arguments that enforce these limits."""
        options = [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # Soft and hard limit alike: between the two grpc refuses calls at random.
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.max_metadata_bytes),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(self.min_ping_interval)),
            # Two servers on one port would split its calls silently: refuse the second,
            # unless they are meant to (worker processes of one `wirework run`).
            ("grpc.so_reuseport", int(self.reuse_port)),
        ]
        if self.max_connection_idle is not None:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle)))
        return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def service_path(proto: ProtoFile) -> str:
    """The full proto name of a derived service: ``wirework.orders.Orders``."""
    return proto.full_name(proto.service)


class GrpcServer:
    """Serve the gRPC endpoints of ``services`` on ``host:port``.

    Args:
        services: the services; each must have at least one gRPC endpoint.
        host: the interface to listen on (``127.0.0.1`` by default: nothing is
            exposed unless asked for).
        port: the TCP port; 0 picks a free one (read it from ``.port``).
        limits: message sizes, stream counts and keepalive (``GrpcLimits``).
        tracer_provider: trace each call with this OpenTelemetry provider
            (``configure_tracing(...).provider``); None uses the global one if
            tracing was configured before this server was built, else traces nothing.

    Raises:
        ConfigurationError: a service without gRPC endpoints, a model that has
            no protobuf form, or two services with one name.
    """

    def __init__(
        self,
        *services: Service,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: GrpcLimits | None = None,
        tracer_provider: Any = None,
    ) -> None:
        if not services:
            raise ConfigurationError("GrpcServer needs at least one Service to serve")
        self.services = services
        self.host = host
        self.limits = limits or GrpcLimits()
        self.health = Health()
        self._requested_port = port
        self._port: int | None = None
        self._server: Any = None
        self._handlers: dict[str, dict[str, Any]] = {}
        self._tracer = call_tracer(tracer_provider, host=host)
        for service in services:
            proto = derive(service)
            path = service_path(proto)
            if path in self._handlers:
                raise ConfigurationError(
                    f"two services would both be gRPC service {path!r}; give them different names"
                )
            self._handlers[path] = _handlers(service, proto, self._tracer)

    @property
    def port(self) -> int:
        """The bound port (the one picked, when started with port 0)."""
        if self._port is None:
            raise ConfigurationError("the GrpcServer is not started; call start() first")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as a client dials it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start answering.

        Raises:
            ConfigurationError: the address cannot be bound (in use, or not this host's).
        """
        if self._server is not None:
            raise ConfigurationError("this GrpcServer is already started")
        server = grpc.aio.server(
            options=self.limits.options(),
            maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
        )
        for path, handlers in self._handlers.items():
            server.add_registered_method_handlers(path, handlers)
            self.health.set(path, SERVING)
        server.add_registered_method_handlers(HEALTH_SERVICE, self.health.handlers())
        self.health.set("", SERVING)
        where = f"{self.host}:{self._requested_port}"
        try:
            port = server.add_insecure_port(
                f"[{self.host}]:{self._requested_port}" if ":" in self.host else where
            )
        except RuntimeError as exc:
            port = 0
            cause: BaseException | None = exc
        else:
            cause = None
        if not port:
            raise ConfigurationError(
                f"cannot listen for gRPC on {where}: the port is in use or the address is "
                f"not this host's; pick another port (0 picks a free one)"
            ) from cause
        await server.start()
        self._server, self._port = server, port
        if self._tracer is not None:
            self._tracer.port = port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, give running ones ``grace`` seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        self.health.set_all(NOT_SERVING)
        await server.stop(grace)

    async def wait_closed(self) -> None:
        """Wait until the server stops (from ``stop()`` elsewhere, or its termination)."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def _handlers(service: Service, proto: ProtoFile, tracer: Any = None) -> dict[str, Any]:
    codec = Codec(proto)
    path = service_path(proto)
    return {
        rpc.endpoint.name: Rpc(
            service,
            rpc.endpoint,
            f"/{path}/{rpc.endpoint.name}",
            codec.codec(rpc.request),
            codec.codec(rpc.response),
        ).handler(tracer)
        for rpc in proto.rpcs
    }
