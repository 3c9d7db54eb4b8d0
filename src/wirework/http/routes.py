"""One raw ASGI app per endpoint, with everything that does not depend on the request built once.

A Starlette ``Route`` given a class instance (not a function) calls it as an
ASGI app, so a request to an endpoint costs no ``Request`` or ``Response``
object: the query string is parsed only when the endpoint has query
parameters, path and query values are validated in one ``params_model``
call (one 422 names every bad one), the body is read with a byte count and a
depth check and validated into ``body_model``, and the result is serialised
by the return model's own serializer into a response whose headers were
encoded at startup. Unary endpoints answer in two ``send`` calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import parse_qsl

import orjson
from pydantic import BaseModel, ValidationError
from starlette.types import Message, Receive, Scope, Send

from wirework.errors import BadRequestError, DeadlineExceededError
from wirework.http.bodies import ClientGoneError, read_body, too_large
from wirework.http.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    UnsupportedEncodingError,
    validation_items,
)
from wirework.http.idempotency import KeyGuard, client_identity, fingerprint
from wirework.http.limits import HttpLimits, json_depth_exceeds
from wirework.http.problems import problem_for, send_error
from wirework.resilience.carriers import HTTP_DEADLINE_HEADER, parse_deadline_header
from wirework.resilience.deadline import Deadline, deadline_scope, run_within
from wirework.service.endpoints import CallContext, Endpoint

log = logging.getLogger("wirework.http")

JSON_MEDIA_TYPE = b"application/json"
NDJSON_MEDIA_TYPE = b"application/x-ndjson"
STREAM_ERROR_KEY = "wirework_error"
"""A server stream failing after its first item ends with ``{"wirework_error": problem}``."""

_DEADLINE = HTTP_DEADLINE_HEADER.encode()
_IDEMPOTENCY_KEY = b"idempotency-key"


class Headers(Mapping[str, str]):
    """The request's headers, lower-case names, decoded only if a handler looks at them."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _items(self) -> dict[str, str]:
        if self._decoded is None:
            decoded: dict[str, str] = {}
            for name, value in self._raw:
                key = name.decode("latin-1")
                text = value.decode("latin-1")
                # RFC 9110 §5.3: repeated fields combine with commas.
                decoded[key] = f"{decoded[key]}, {text}" if key in decoded else text
            self._decoded = decoded
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


class EndpointRoute:
    """The ASGI app answering one endpoint of one service."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        service_name: str,
        resolve: Callable[[type[Any], str], Any],
        limits: HttpLimits,
        keys: KeyGuard | None = None,
        identity_header: str = "authorization",
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        """Idempotency-Key storage (``wirework.http.idempotency``), when the endpoint has it."""
        self.identity_header = identity_header.lower().encode("latin-1")
        self.service_name = service_name
        self.resolve = resolve
        self.handler = endpoint.function
        self.max_body_bytes = limits.max_body_bytes
        self.max_json_depth = limits.max_json_depth
        self.has_params = bool(endpoint.params)
        self.query_names = frozenset(p.name for p in endpoint.params if p.source == "query")
        self.sources = {p.name: p.source for p in endpoint.params}
        self.body_model = endpoint.body_model
        self.body_name = endpoint.body_name
        self.streaming = endpoint.streaming
        self.status = endpoint.status_code
        self.takes_arguments = endpoint.context_name is not None or bool(endpoint.dependencies)
        returns = endpoint.returns
        self.serialize: Callable[[Any], bytes] | None = (
            returns.__pydantic_serializer__.to_json if returns is not None else None
        )
        self.returns = returns
        self.content_type = (b"content-type", JSON_MEDIA_TYPE)
        self.stream_start: Message = {
            "type": "http.response.start",
            "status": self.status,
            "headers": [(b"content-type", NDJSON_MEDIA_TYPE), (b"cache-control", b"no-store")],
        }
        self.no_content: Message = {"type": "http.response.start", "status": self.status}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._answer(scope, receive, send)
        except ClientGoneError:
            return
        except Exception as error:  # every failure is answered as problem+json
            await send_error(send, error, scope["path"])

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A bad or missing key is refused before the body is read, and nothing is stored.
        key = None if self.keys is None else self.keys.key_of(scope["headers"])
        values, invalid = self._params(scope)
        headers: dict[bytes, bytes] = dict(scope["headers"])
        body = b""
        if self.body_name is not None:
            encoding = headers.get(b"content-encoding")
            if self.streaming in ("unary", "server"):
                body = await read_body(receive, self.max_body_bytes, encoding)
                try:
                    values[self.body_name] = self._decode(body, self._model(), ["body"])
                except InvalidInputError as error:
                    if not invalid:
                        raise
                    invalid.extend(error.items)
            elif encoding is not None and encoding.lower() != b"identity":
                raise UnsupportedEncodingError(
                    "a client stream is read as it arrives and cannot be compressed; "
                    "send it without Content-Encoding"
                )
            else:
                values[self.body_name] = self._messages(receive)
        if invalid:
            raise InvalidInputError(invalid)  # path, query and body errors in one answer
        header = headers.get(_DEADLINE)
        deadline = None if header is None else parse_deadline_header(header.decode("latin-1"))
        if self.takes_arguments:
            context = self._context(scope, headers, deadline, key)
            arguments = self.endpoint.arguments(values, context, self.resolve)
        else:
            arguments = values  # no context or dependencies: the same as arguments() gives
        if self.streaming == "server":
            await self._stream(arguments, deadline, scope, receive, send)
            return
        if self.keys is not None and key is not None:
            identity = client_identity(scope["headers"], scope.get("client"), self.identity_header)
            request = fingerprint(
                scope["method"],
                scope.get("raw_path") or scope["path"].encode(),
                scope["query_string"],
                body,
            )

            async def respond(answer: Send) -> None:
                await self._respond(arguments, deadline, answer)

            await self.keys.run(key, identity, request, respond, send, scope["path"])
            return
        await self._respond(arguments, deadline, send)

    async def _respond(
        self, arguments: dict[str, Any], deadline: Deadline | None, send: Send
    ) -> None:
        """Run a unary handler and send its answer (an error it raises is the caller's)."""
        if deadline is None:
            result = await self.handler(**arguments)
        else:
            result = await run_within(deadline, lambda: self.handler(**arguments))
        if self.serialize is None:
            await send(self.no_content)
            await send({"type": "http.response.body", "body": b""})
            return
        if not isinstance(result, self.returns):  # type: ignore[arg-type]
            raise TypeError(
                f"endpoint {self.endpoint.qualname} returned {type(result).__name__}, "
                f"not the {self.returns!r} its annotation declares"
            )
        body = self.serialize(result)
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [self.content_type, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -- inputs ---------------------------------------------------------------------

    def _params(self, scope: Scope) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The validated path and query values, or the list of what is wrong with them."""
        if not self.has_params:
            return {}, []
        raw: dict[str, Any] = {}
        if self.query_names and scope["query_string"]:
            for name, value in parse_qsl(scope["query_string"].decode("latin-1"), True):
                if name in self.query_names:
                    raw[name] = value
        raw.update(scope["path_params"])
        try:
            params = self.endpoint.params_model.model_validate(raw)
        except ValidationError as error:
            return {}, self._param_items(error)
        return dict(params.__dict__), []

    def _param_items(self, error: ValidationError) -> list[dict[str, Any]]:
        items = validation_items(error, ())
        for item in items:
            name = item["loc"][0] if item["loc"] else ""
            item["loc"] = [self.sources.get(str(name), "query"), *item["loc"]]
        return items

    def _model(self) -> type[BaseModel]:
        """The body model: called only where ``inspect_endpoint`` set it with the body name."""
        return cast(type[BaseModel], self.body_model)

    def _decode(self, data: bytes, model: type[BaseModel], where: list[str | int]) -> BaseModel:
        if json_depth_exceeds(data, self.max_json_depth):
            raise BadRequestError(
                f"the JSON {where[0]} nests deeper than {self.max_json_depth} levels "
                f"(HttpLimits.max_json_depth); flatten it"
            )
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise BadRequestError(
                f"the {where[0]} is not valid JSON ({error.msg} at character {error.pos}); "
                f"send a JSON document matching the {model.__name__} schema"
            ) from None
        try:
            return model.model_validate(document)
        except ValidationError as error:
            raise InvalidInputError(validation_items(error, where)) from None

    async def _messages(self, receive: Receive) -> AsyncIterator[BaseModel]:
        """The NDJSON request body as models, one per line, counted against the limit."""
        model = self._model()
        pending = b""
        total = 0
        index = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            total += len(chunk)
            if total > self.max_body_bytes:
                raise PayloadTooLargeError(too_large(self.max_body_bytes))
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    yield self._decode(line, model, ["body", index])
                    index += 1
        if pending.strip():
            yield self._decode(pending, model, ["body", index])

    def _context(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        deadline: Deadline | None,
        parsed_key: str | None,
    ) -> CallContext:
        # With key storage the parsed key (unquoted); without, the header as sent.
        key = parsed_key if self.keys is not None else headers.get(_IDEMPOTENCY_KEY)
        client = scope.get("client")
        return CallContext(
            service_name=self.service_name,
            endpoint=self.endpoint.name,
            protocol="http",
            headers=Headers(scope["headers"]),
            peer=f"{client[0]}:{client[1]}" if client else None,
            deadline=(
                asyncio.get_running_loop().time() + deadline.remaining()
                if deadline is not None
                else None
            ),
            idempotency_key=key.decode("latin-1") if isinstance(key, bytes) else key,
            client_identity=client_identity(scope["headers"], client, self.identity_header),
        )

    # -- server streams ---------------------------------------------------------------

    async def _stream(
        self,
        arguments: dict[str, Any],
        deadline: Deadline | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Send the handler's items as NDJSON, cut when the client leaves or the deadline passes.

        The status line waits for the first item, so an error raised before it
        (a 404, a deadline) is an ordinary problem+json response; one raised
        after it ends the stream with a ``{"wirework_error": problem}`` line.
        """
        items: AsyncIterator[BaseModel] = self.handler(**arguments)
        # A stream always has an item model (inspect_endpoint refuses one without).
        serialize = cast(Callable[[Any], bytes], self.serialize)
        started = False

        async def pump() -> None:
            nonlocal started
            loop = asyncio.get_running_loop()
            when = None if deadline is None else loop.time() + deadline.remaining()
            try:
                async with asyncio.timeout_at(when) as limit:
                    async for item in items:
                        line = serialize(item) + b"\n"
                        if not started:
                            started = True
                            await send(self.stream_start)
                        await send({"type": "http.response.body", "body": line, "more_body": True})
            except TimeoutError as error:
                if not limit.expired():
                    raise
                raise DeadlineExceededError(
                    f"the stream was cut at the caller's deadline (the {HTTP_DEADLINE_HEADER} "
                    f"header); ask for fewer items or allow more time"
                ) from error

        with deadline_scope(deadline):
            try:
                async with asyncio.TaskGroup() as group:
                    watcher = group.create_task(_watch_disconnect(receive))
                    try:
                        await pump()
                    finally:
                        watcher.cancel()
            except BaseExceptionGroup as failures:
                error = failures.exceptions[0]
                if isinstance(error, ClientGoneError):
                    return
                if not isinstance(error, Exception):
                    raise
                if not started:
                    raise error from None
                problem = problem_for(error, scope["path"])
                line = orjson.dumps({STREAM_ERROR_KEY: problem}) + b"\n"
                await send({"type": "http.response.body", "body": line, "more_body": True})
            finally:
                await _close(items, self.endpoint.qualname)
        if not started:
            await send(self.stream_start)
        await send({"type": "http.response.body", "body": b""})


async def _close(items: AsyncIterator[BaseModel], where: str) -> None:
    """Run the generator's ``finally`` blocks now, not whenever it is collected."""
    close = getattr(items, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("stream endpoint %s failed while closing", where)


async def _watch_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
