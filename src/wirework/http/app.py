"""``http_app``: the Starlette application serving services' endpoints over REST.

Routes, the OpenAPI document and the health check are built once, when the
app is made; a request then runs the endpoint's precomputed ASGI app
(``wirework.http.routes``) behind one limits check. Unknown paths (404),
wrong methods (405) and anything that escapes a route (500) are answered as
problem+json too, so a caller parses one error format whatever happened.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wirework.errors import NotFoundError
from wirework.http.errors import MethodNotAllowedError
from wirework.http.idempotency import (
    OPENAPI_RESPONSES,
    IdempotencySettings,
    key_guard,
    openapi_parameter,
)
from wirework.http.limits import HttpLimits, LimitsMiddleware
from wirework.http.openapi import HEALTH_PATH, OPENAPI_PATH, openapi_document
from wirework.http.problems import PROBLEM_MEDIA_TYPE, make_problem, problem_for
from wirework.http.routes import JSON_MEDIA_TYPE, EndpointRoute
from wirework.http.traced import TracedRoute
from wirework.service.endpoints import Endpoint
from wirework.service.service import Service

log = logging.getLogger("wirework.http")


class StaticJson:
    """An ASGI app answering every request with the same JSON bytes (health, OpenAPI)."""

    def __init__(self, body: bytes) -> None:
        self.start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", JSON_MEDIA_TYPE), (b"content-length", b"%d" % len(body))],
        }
        self.body = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self.start)
        await send(self.body)


class MethodDispatch:
    """The endpoints of one path by method: one route per path, so a 405 lists every method."""

    def __init__(self, apps: dict[str, ASGIApp]) -> None:
        self.apps = dict(apps)
        if "GET" in self.apps:
            self.apps.setdefault("HEAD", self.apps["GET"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The Route checked the method against the same keys before calling.
        await self.apps[scope["method"]](scope, receive, send)


def http_app(
    *services: Service,
    limits: HttpLimits | None = None,
    title: str | None = None,
    version: str = "1.0.0",
    idempotency: IdempotencySettings | None = None,
    tracer_provider: Any | None = None,
) -> Starlette:
    """The ASGI app answering every ``http=True`` endpoint of ``services`` over REST.

    Also serves ``GET /healthz`` (200 ``{"status":"ok"}``) and ``GET
    /openapi.json`` (OpenAPI 3.1). Bidirectional streams are not routed:
    HTTP/1.1 cannot carry them; they are gRPC-only, as the document says.

    Args:
        services: the services whose endpoints to serve.
        limits: what a request may send (``HttpLimits()``: RELIABILITY.md §3.7).
        title: the OpenAPI title (default: the services' names).
        version: the OpenAPI ``info.version`` of this API.
        idempotency: how ``Idempotency-Key`` records are kept
            (``IdempotencySettings()``: 24 h). Endpoints with
            ``idempotency="optional"`` or ``"required"`` keep them in their
            service's store (``Service(store=...)``); see docs/http.md.
        tracer_provider: an OpenTelemetry tracer provider for SERVER spans;
            None traces only when the process configured a real one globally.

    Raises:
        ConfigurationError: two endpoints share a method and path, or a name;
            an endpoint requires an Idempotency-Key and its service has no store.
    """
    limits = limits or HttpLimits()
    idempotency = idempotency or IdempotencySettings()
    key_parameters: dict[str, list[dict[str, Any]]] = {}
    routed: list[tuple[str, Endpoint]] = []
    grpc_only: list[tuple[str, Endpoint]] = []
    by_path: dict[str, dict[str, ASGIApp]] = {}
    for service in services:
        for endpoint in service.endpoints:
            if not endpoint.http:
                continue
            if endpoint.streaming == "bidi":
                grpc_only.append((service.name, endpoint))
                continue
            routed.append((service.name, endpoint))
            keys = key_guard(service, endpoint, idempotency)
            if keys is not None:
                key_parameters[endpoint.name] = [openapi_parameter(endpoint, idempotency)]
            answer = EndpointRoute(
                endpoint,
                service_name=service.name,
                resolve=service.resolve,
                limits=limits,
                keys=keys,
                identity_header=idempotency.identity_header,
            )
            by_path.setdefault(endpoint.path, {})[endpoint.method] = TracedRoute(
                answer, endpoint.method, endpoint.path, tracer_provider
            )
    document = openapi_document(
        routed,
        title=title or ", ".join(service.name for service in services) or "wirework",
        version=version,
        grpc_only=grpc_only,
        header_parameters=key_parameters,
        extra_responses=dict.fromkeys(key_parameters, OPENAPI_RESPONSES),
    )
    routes: list[BaseRoute] = [
        Route(path, MethodDispatch(apps), methods=list(apps)) for path, apps in by_path.items()
    ]
    routes.append(Route(HEALTH_PATH, StaticJson(b'{"status":"ok"}'), methods=["GET"]))
    routes.append(Route(OPENAPI_PATH, StaticJson(orjson.dumps(document)), methods=["GET"]))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(LimitsMiddleware, limits=limits)],
        exception_handlers={HTTPException: _http_problem, Exception: _server_problem},
    )
    app.state.openapi = document
    app.state.limits = limits
    return app


def _problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(problem),
        status_code=problem["status"],
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


async def _http_problem(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (no route, wrong method) as problem+json."""
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for HTTPException
        return await _server_problem(request, exc)
    path = request.url.path
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error: Exception = NotFoundError(
            f"no endpoint answers {request.method} {path}; GET {OPENAPI_PATH} lists them"
        )
        return _problem_response(problem_for(error, path), headers)
    if exc.status_code == 405:
        error = MethodNotAllowedError(
            f"{path} does not answer {request.method}; it answers {headers.get('Allow', '?')}"
        )
        return _problem_response(problem_for(error, path), headers)
    problem = make_problem(exc.status_code, f"http_{exc.status_code}", exc.detail, path)
    return _problem_response(problem, headers)


async def _server_problem(request: Request, exc: Exception) -> Response:
    """Whatever escaped a route: 500, the traceback logged (by ``problem_for``), never sent."""
    return _problem_response(problem_for(exc, request.url.path))
