"""The OpenAPI 3.1 document of the endpoints a set of services serves over HTTP.

Built once from the ``Endpoint`` declarations, never from the routes: the
schemas are pydantic's own JSON Schema (OpenAPI 3.1 *is* JSON Schema
2020-12), generated in one pass over every model so a model used by several
endpoints is one shared component. Request bodies use a model's validation
schema and responses its serialization schema; pydantic names the two
``Model-Input`` and ``Model-Output`` only where they differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from wirework.errors import ConfigurationError
from wirework.http.problems import PROBLEM_MEDIA_TYPE, Problem
from wirework.service.endpoints import Endpoint

REF_TEMPLATE = "#/components/schemas/{model}"
HEALTH_PATH = "/healthz"
OPENAPI_PATH = "/openapi.json"

Mode = Literal["validation", "serialization"]


def openapi_document(
    routed: Sequence[tuple[str, Endpoint]],
    *,
    title: str,
    version: str = "1.0.0",
    grpc_only: Sequence[tuple[str, Endpoint]] = (),
    header_parameters: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    extra_responses: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routed``: ``(service name, endpoint)`` pairs.

    ``grpc_only`` (bidirectional streams) are listed in the description, as
    HTTP/1.1 cannot carry them. ``header_parameters`` and ``extra_responses``
    (status to description, answered as problem+json) add to an endpoint's
    operation by endpoint name (the ``Idempotency-Key`` header, say).

    Raises:
        ConfigurationError: two endpoints of different services share an
            operationId (the endpoint name) or a method and path.
    """
    wanted: list[tuple[type[BaseModel], Mode]] = [(Problem, "serialization")]
    for _, endpoint in routed:
        if endpoint.params:
            wanted.append((endpoint.params_model, "validation"))
        if endpoint.body_model is not None:
            wanted.append((endpoint.body_model, "validation"))
        if endpoint.returns is not None:
            wanted.append((endpoint.returns, "serialization"))
    refs, definitions = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF_TEMPLATE)
    components: dict[str, Any] = dict(definitions.get("$defs", {}))
    params_components: set[str] = set()
    problem_ref = refs[(Problem, "serialization")]

    paths: dict[str, dict[str, Any]] = {HEALTH_PATH: {"get": _health_operation()}}
    seen: dict[str, str] = {}
    for service_name, endpoint in routed:
        where = f"{service_name}.{endpoint.qualname}"
        if endpoint.name in seen:
            raise ConfigurationError(
                f"endpoints {seen[endpoint.name]} and {where} are both named "
                f"{endpoint.name!r} (the operationId); pass name=... to one"
            )
        seen[endpoint.name] = where
        operations = paths.setdefault(endpoint.path, {})
        method = endpoint.method.lower()
        if method in operations:
            raise ConfigurationError(
                f"{where} and another endpoint both answer {endpoint.method} {endpoint.path}"
            )
        parameters: list[dict[str, Any]] = []
        if endpoint.params:
            name = _component_name(refs[(endpoint.params_model, "validation")])
            params_components.add(name)
            properties = components[name].get("properties", {})
            for param in endpoint.params:
                schema = dict(properties[param.name])
                schema.pop("title", None)
                parameters.append(
                    {
                        "name": param.name,
                        "in": param.source,
                        "required": param.required,
                        "schema": schema,
                    }
                )
        parameters.extend((header_parameters or {}).get(endpoint.name, ()))
        responses = _responses(endpoint, refs, problem_ref)
        for status, text in (extra_responses or {}).get(endpoint.name, {}).items():
            if status in responses:
                responses[status]["description"] += f" Or: {text}"
            else:
                responses[status] = {
                    "description": text,
                    "content": {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}},
                }
        operation: dict[str, Any] = {
            "operationId": endpoint.name,
            "tags": [service_name],
            "responses": responses,
        }
        if endpoint.summary:
            operation["summary"] = endpoint.summary
        if endpoint.description:
            operation["description"] = endpoint.description
        if parameters:
            operation["parameters"] = parameters
        if endpoint.body_model is not None:
            media = "application/x-ndjson" if endpoint.streaming == "client" else "application/json"
            operation["requestBody"] = {
                "required": True,
                "content": {media: {"schema": refs[(endpoint.body_model, "validation")]}},
            }
        operations[method] = operation
    for name in params_components:
        components.pop(name, None)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": _description(grpc_only)},
        "paths": paths,
        "components": {"schemas": components},
    }


def _responses(
    endpoint: Endpoint,
    refs: Mapping[tuple[Any, Mode], Any],
    problem_ref: Any,
) -> dict[str, Any]:
    problem = {"content": {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}}
    responses: dict[str, Any] = {}
    status = str(endpoint.status_code)
    if endpoint.returns is None:
        responses[status] = {"description": "Done; no content."}
    elif endpoint.streaming == "server":
        responses[status] = {
            "description": (
                "A stream of items, one JSON document per line (NDJSON). If the stream fails "
                'after its first item, its last line is {"wirework_error": <Problem>}.'
            ),
            "content": {
                "application/x-ndjson": {"schema": refs[(endpoint.returns, "serialization")]}
            },
        }
    else:
        responses[status] = {
            "description": "Success.",
            "content": {"application/json": {"schema": refs[(endpoint.returns, "serialization")]}},
        }
    if endpoint.params or endpoint.body_model is not None:
        responses["422"] = {"description": "Invalid input; `errors` lists each value.", **problem}
    if endpoint.body_model is not None:
        responses["400"] = {"description": "The body is not JSON, or nests too deep.", **problem}
        responses["413"] = {"description": "The body is over the size limit.", **problem}
    responses["default"] = {
        "description": "An error, as RFC 9457 problem details (the handler's or a limit's).",
        **problem,
    }
    return responses


def _health_operation() -> dict[str, Any]:
    return {
        "operationId": "Healthz",
        "summary": "Whether the server answers.",
        "responses": {
            "200": {
                "description": "The server is up.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"status": {"const": "ok"}},
                            "required": ["status"],
                        }
                    }
                },
            }
        },
    }


def _description(grpc_only: Sequence[tuple[str, Endpoint]]) -> str:
    text = (
        "Errors are RFC 9457 problem details (application/problem+json); `error_type` names "
        "the error class and `retriable` says whether repeating the call may succeed. "
        "`x-wirework-deadline` (remaining milliseconds) bounds a call. An operation listing "
        "an `Idempotency-Key` header stores and replays answers by key, as that header's "
        "description says; elsewhere the key is only passed to the handler."
    )
    if grpc_only:
        names = ", ".join(f"{service}.{endpoint.name}" for service, endpoint in grpc_only)
        text += (
            f" Bidirectional streams are served over gRPC only (HTTP/1.1 cannot carry them): "
            f"{names}."
        )
    return text


def _component_name(ref: Any) -> str:
    return str(ref["$ref"]).rsplit("/", 1)[-1]
