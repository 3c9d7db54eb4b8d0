"""Turning a typed call's arguments into an HTTP request, for ``HttpClient``.

Validation is the endpoint's own (``params_model``, ``body_model``), so a bad
call fails on the caller's side with every field named, before anything is
sent; values are then encoded the way the server reads them: path segments
percent-encoded, query values as JSON scalars (``true``, not ``True``), the
body by its model's serializer, a client stream as NDJSON lines.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from wirework.errors import ConfigurationError
from wirework.http.errors import InvalidInputError, validation_items
from wirework.service.endpoints import Endpoint


class PreparedRequest:
    """What one call sends: the path, the query, the body and its media type."""

    __slots__ = ("body", "content_type", "path", "query")

    def __init__(
        self,
        path: str,
        query: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
        content_type: str | None,
    ) -> None:
        self.path = path
        self.query = query
        self.body = body
        self.content_type = content_type


class PreparedRoute:
    """One endpoint as a client sends it: arguments validated and encoded, names prepared once."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.param_names = frozenset(p.name for p in endpoint.params)
        self.path_names = tuple(p.name for p in endpoint.params if p.source == "path")
        self.accepted = self.param_names | (
            {endpoint.body_name} if endpoint.body_name is not None else set()
        )

    def request(self, arguments: Mapping[str, Any]) -> PreparedRequest:
        endpoint = self.endpoint
        unknown = sorted(set(arguments) - self.accepted)
        if unknown:
            raise ConfigurationError(
                f"{endpoint.name} takes {sorted(self.accepted)}, not {unknown} "
                f"(context and dependencies are the server's)"
            )
        params = {name: value for name, value in arguments.items() if name in self.param_names}
        items: list[dict[str, Any]] = []
        encoded: dict[str, Any] = {}
        if self.param_names:
            try:
                validated = endpoint.params_model.model_validate(params)
            except ValidationError as exc:
                items.extend(_located(validation_items(exc, ()), endpoint))
            else:
                encoded = validated.model_dump(mode="json")
        body: bytes | AsyncIterator[bytes] | None = None
        content_type: str | None = None
        if endpoint.body_name is not None and endpoint.body_model is not None:
            value = arguments.get(endpoint.body_name)
            if endpoint.streaming == "client":
                body = _ndjson(value, endpoint.body_model, endpoint.name)
                content_type = "application/x-ndjson"
            else:
                try:
                    model = _as_model(endpoint.body_model, value)
                except ValidationError as exc:
                    items.extend(validation_items(exc, ("body",)))
                else:
                    body = endpoint.body_model.__pydantic_serializer__.to_json(model)
                    content_type = "application/json"
        if items:
            raise InvalidInputError(items)
        path = endpoint.path
        if self.path_names:
            path = path.format_map(
                {name: quote(_text(encoded[name]), safe="") for name in self.path_names}
            )
        query = {
            p.name: _text(encoded[p.name])
            for p in endpoint.params
            if p.source == "query" and encoded.get(p.name) is not None
        }
        return PreparedRequest(path, query, body, content_type)


async def _ndjson(value: Any, model: type[BaseModel], where: str) -> AsyncIterator[bytes]:
    """A client stream's messages as NDJSON lines, each validated before it is sent."""
    serializer = model.__pydantic_serializer__
    if isinstance(value, AsyncIterable):
        async for item in value:
            yield serializer.to_json(_message(model, item, where)) + b"\n"
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, BaseModel)):
        for item in value:
            yield serializer.to_json(_message(model, item, where)) + b"\n"
    else:
        raise ConfigurationError(
            f"{where} takes a stream: pass an iterable or async iterable of {model.__name__}"
        )


def _message(model: type[BaseModel], item: Any, where: str) -> BaseModel:
    try:
        return _as_model(model, item)
    except ValidationError as exc:
        raise InvalidInputError(validation_items(exc, ("body",))) from None


def _as_model(model: type[BaseModel], value: Any) -> BaseModel:
    if isinstance(value, model):
        return value
    return model.model_validate(value)


def _located(items: list[dict[str, Any]], endpoint: Endpoint) -> list[dict[str, Any]]:
    sources = {p.name: p.source for p in endpoint.params}
    for item in items:
        name = str(item["loc"][0]) if item["loc"] else ""
        item["loc"] = [sources.get(name, "query"), *item["loc"]]
    return items


def _text(value: Any) -> str:
    """A JSON-mode value as it goes in a URL: ``true``, not ``True``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)
