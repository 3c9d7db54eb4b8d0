"""The OpenAPI 3.1 document, and schemathesis fuzzing the app against it.

schemathesis generates requests from ``/openapi.json`` (valid and invalid
ones) and checks every answer: no server error, a documented status and
content type, and a body that matches the documented schema.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.http_binding.catalog import Note, catalog
from wirework.errors import ConfigurationError
from wirework.http import http_app
from wirework.service import Service


@schemathesis.serializer("application/x-ndjson")
def _ndjson(context: schemathesis.SerializationContext, value: Any) -> bytes:
    """A client stream of one message: the generated body, as one NDJSON line."""
    return json.dumps(value).encode() + b"\n"


app = http_app(catalog)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_response_matches_the_schema(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)


def test_the_document_shares_components_and_leaves_bidi_to_grpc() -> None:
    document = app.state.openapi
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert {"Item", "NewItem", "Problem", "Colour"} <= set(schemas)
    assert not any(name.endswith("Params") for name in schemas)
    get_item = document["paths"]["/v1/items/{item_id}"]["get"]
    assert get_item["operationId"] == "GetItem"
    assert get_item["parameters"] == [
        {"name": "item_id", "in": "path", "required": True, "schema": {"type": "integer"}}
    ]
    add_item = document["paths"]["/v1/items"]["post"]
    assert add_item["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/NewItem"
    }
    assert set(add_item["responses"]) == {"201", "400", "413", "422", "default"}
    assert "/v1/chat" not in document["paths"]
    assert "catalog.Chat" in document["info"]["description"]


def test_two_services_answering_the_same_route_or_name_are_refused() -> None:
    first, second = Service("first"), Service("second")

    @first.get("/v1/ping")
    async def ping() -> Note:
        return Note(text="first")

    @second.get("/v1/ping", name="PingAgain")
    async def ping_again() -> Note:
        return Note(text="second")

    with pytest.raises(ConfigurationError, match="GET /v1/ping"):
        http_app(first, second)

    third = Service("third")

    @third.get("/v1/pong", name="Ping")
    async def pong() -> Note:
        return Note(text="third")

    with pytest.raises(ConfigurationError, match="'Ping'"):
        http_app(first, third)
