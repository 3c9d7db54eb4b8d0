"""A SERVER span around each REST call, when tracing is on.

The binding does not import OpenTelemetry unless a tracer provider is given
or the process has configured a real (SDK) one globally
(``wirework.tracing.configure_tracing``); otherwise a request costs one
cached check. The span is named ``"<METHOD> <route template>"`` and carries
the HTTP semantic-convention attributes; the caller's ``traceparent`` (or B3)
makes it a child of the caller's span, and a bad one starts a new trace
without failing the request (RELIABILITY.md lesson 10).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def sdk_provider_active() -> Any | None:
    """The global tracer provider if it is a real SDK one, else None (tracing is off)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ModuleNotFoundError:  # the tracing extra is not installed
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


class TracedRoute:
    """Wraps one endpoint's ASGI app in a SERVER span (``provider`` None: the global one)."""

    def __init__(self, app: ASGIApp, method: str, path: str, provider: Any | None) -> None:
        self.app = app
        self.name = f"{method} {path}"
        self.route = path
        self.provider = provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        provider = self.provider or sdk_provider_active()
        if provider is None:
            await self.app(scope, receive, send)
            return
        from wirework.tracing.calls import record_http_status, server_span

        attributes = {
            "http.request.method": scope["method"],
            "http.route": self.route,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        status: list[int] = []

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with server_span(
            self.name, scope["headers"], attributes=attributes, provider=provider
        ) as span:
            await self.app(scope, receive, watched)
            if status:
                record_http_status(span, status[0], server=True)
