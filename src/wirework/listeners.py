"""The REST and gRPC listeners ``wirework run --http/--grpc`` opens beside the services.

One HTTP server (``wirework.http``) serves every endpoint of every service
run in the process, and Prometheus metrics at ``/metrics`` when the tracing
extra is installed; one gRPC server (``wirework.grpc``) serves the same
endpoints over gRPC. They open once every service has started (an endpoint
may publish or send a request) and close before the services stop, so a
request in flight finishes on a broker that is still open. With several
worker processes each binds the same port with ``SO_REUSEPORT`` and the
kernel spreads connections across them.

The bindings import Starlette, uvicorn and grpcio; this module imports them
only when a listener is asked for, so ``wirework run`` works without them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from wirework.errors import ConfigurationError
from wirework.service import Service

log = logging.getLogger("wirework.run")

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Address:
    """Where a listener binds: ``host:port``, ``:port`` (loopback) or ``[::1]:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, option: str) -> Address:
        """Read ``text``; raises ``ConfigurationError`` naming ``option`` and what to write."""
        host, colon, port_text = text.strip().rpartition(":")
        if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigurationError(
                f"{option} {text!r} is not host:port; write e.g. {option} 127.0.0.1:8000, "
                f"{option} :8000 (loopback) or {option} 0.0.0.0:8000 (every interface)"
            )
        host = host.strip("[]") or DEFAULT_HOST
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Listeners:
    """The HTTP and gRPC servers of one process; ``start`` and ``stop`` around the services."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        http: Address | None = None,
        grpc: Address | None = None,
        shared_port: bool = False,
        grace: float = 5.0,
    ) -> None:
        self.services = list(services)
        self.http = http
        self.grpc = grpc
        self.shared_port = shared_port
        self.grace = grace
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self.metrics: Callable[..., Awaitable[None]] | None = None
        """The ``/metrics`` ASGI app (None without the tracing extra)."""
        if http is not None:
            # Built now, before the services start: it adds their latency middleware.
            try:
                from wirework.tracing.metrics import metrics_app
            except ModuleNotFoundError:  # no tracing extra: no /metrics
                self.metrics = None
            else:
                self.metrics = metrics_app(*self.services)
        served = [s for s in self.services if s.endpoints]
        if grpc and not served:
            names = ", ".join(s.name for s in self.services)
            raise ConfigurationError(
                f"--grpc given, but none of the services ({names}) declares an endpoint; "
                f"add one with @svc.get(...) or @svc.post(...), or drop the option "
                f"(--http alone still serves /metrics and /healthz)"
            )

    @property
    def wanted(self) -> bool:
        return self.http is not None or self.grpc is not None

    async def start(self) -> None:
        """Open every listener asked for; on a failure close what was opened and raise."""
        try:
            if self.http is not None:
                from starlette.routing import Mount

                from wirework.http import HttpServer, http_app

                app = http_app(*self.services)
                if self.metrics is not None:
                    app.router.routes.append(Mount("/metrics", app=self.metrics))
                server = HttpServer(
                    app,
                    self.http.host,
                    self.http.port,
                    grace=self.grace,
                    reuse_port=self.shared_port,
                )
                await server.start()
                self._stops.append(server.stop)
                log.info("REST on %s (OpenAPI at %s/openapi.json)", server.url, server.url)
            if self.grpc is not None:
                from wirework.grpc import GrpcLimits, GrpcServer

                grpc_server = GrpcServer(
                    *self.services,
                    host=self.grpc.host,
                    port=self.grpc.port,
                    limits=GrpcLimits(reuse_port=self.shared_port),
                )
                await grpc_server.start()
                self._stops.append(lambda: grpc_server.stop(self.grace))
                log.info("gRPC on %s:%d", self.grpc.host, grpc_server.port)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop taking calls and let those in flight finish (up to ``grace``)."""
        stops, self._stops = self._stops, []
        for stop in reversed(stops):
            try:
                await stop()
            except Exception:
                log.exception("a listener did not stop cleanly")
