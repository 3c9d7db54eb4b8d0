"""Synchronous endpoints: one typed handler, reached over REST and gRPC.

``@svc.get("/v1/orders/{order_id}")`` declares an endpoint; this module reads
the handler's signature once, at decoration time, into an ``Endpoint`` that
both bindings serve from (``wirework.http`` and ``wirework.grpc``):

* a parameter named in the path (``{order_id}``) is a **path** parameter;
* any other scalar parameter (str, int, float, bool, UUID, an Enum, or one of
  those ``| None``) is a **query** parameter, optional when it has a default;
* the one parameter annotated with a pydantic model is the **body** (POST,
  PUT and PATCH only); annotated ``AsyncIterator[Model]`` it is a stream of
  bodies (client streaming, gRPC only, or NDJSON over HTTP);
* a parameter annotated ``CallContext`` gets the call's context;
* any other annotated class is a dependency the service ``provide``-s.

The return annotation is the response model, ``None`` for no content, or
``AsyncIterator[Model]`` for a server stream (the handler is an async
generator). Path and query parameters and the body together make the
endpoint's ``request_model``: the gRPC request message and the typed
client's input. When the body is the only input, the body model itself is the
request message, so a ``.proto`` reads the way a person would write it.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import re
import types
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, create_model

from wirework.errors import ConfigurationError

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
Streaming = Literal["unary", "server", "client", "bidi"]
ParamSource = Literal["path", "query"]
IdempotencyMode = Literal["off", "optional", "required"]

#: Methods whose repetition has the effect of one call (RFC 9110 §9.2.2): safe to retry.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "PUT", "DELETE"})
BODY_METHODS: frozenset[str] = frozenset({"POST", "PUT", "PATCH"})
SCALAR_TYPES: tuple[type, ...] = (str, int, float, bool, uuid.UUID)

_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEGMENT = r"(?:[A-Za-z0-9._~\-]+|\{[A-Za-z_][A-Za-z0-9_]*\})"
_PATH_SHAPE = re.compile(rf"^/$|^(?:/{_SEGMENT})+$")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a REST or gRPC handler knows about the call it answers.

    ``headers`` has lower-case names (HTTP headers, or gRPC metadata).
    ``deadline`` is the caller's deadline as seconds on the event loop's
    clock (``loop.time()``), or None when the caller set none; pass it on
    (the resilience policies read it) so a downstream call never outlives its
    caller. ``idempotency_key`` is the ``Idempotency-Key`` header when sent.
    """

    service_name: str
    endpoint: str
    protocol: Literal["http", "grpc"]
    headers: Mapping[str, str] = field(default_factory=dict)
    peer: str | None = None
    deadline: float | None = None
    idempotency_key: str | None = None
    client_identity: str | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True, slots=True)
class Param:
    """One path or query parameter: its name, scalar type and default."""

    name: str
    annotation: Any
    source: ParamSource
    required: bool
    default: Any = None


@dataclass(frozen=True)
class Endpoint:
    """A handler and how it is reached; built once by ``inspect_endpoint``."""

    method: HttpMethod
    path: str
    name: str
    function: Callable[..., Any]
    params: tuple[Param, ...]
    body_name: str | None
    body_model: type[BaseModel] | None
    context_name: str | None
    dependencies: Mapping[str, type[Any]]
    returns: type[BaseModel] | None
    streaming: Streaming
    status_code: int
    http: bool
    grpc: bool
    idempotent: bool
    summary: str
    description: str
    request_model: type[BaseModel]
    params_model: type[BaseModel]
    """Path and query parameters alone, validated together (one error names every bad one)."""
    idempotency: IdempotencyMode = "off"
    """How the REST binding treats ``Idempotency-Key`` (``wirework.http.idempotency``).

    ``optional`` by default for unary POST and PATCH, the two methods whose
    repetition is not harmless (RFC 9110 §9.2.2), so a client may make their
    retries safe with a key; ``off`` for GET, PUT and DELETE (already
    idempotent) and for streams, whose bodies cannot be fingerprinted before
    the handler runs nor their answers replayed whole.
    """

    @property
    def qualname(self) -> str:
        return getattr(self.function, "__qualname__", repr(self.function))

    @property
    def body_is_request(self) -> bool:
        """Whether the body model itself is the request message (no path or query params)."""
        return self.body_model is not None and not self.params

    def arguments(
        self,
        values: Mapping[str, Any],
        context: CallContext,
        resolve: Callable[[type[Any], str], Any],
    ) -> dict[str, Any]:
        """Keyword arguments for the handler: ``values`` (params and body by name), the
        context, and each dependency from ``resolve(kind, needed_by)``."""
        arguments = dict(values)
        if self.context_name is not None:
            arguments[self.context_name] = context
        for name, kind in self.dependencies.items():
            arguments[name] = resolve(kind, self.qualname)
        return arguments

    def split_request(self, request: BaseModel) -> dict[str, Any]:
        """The handler's values from one ``request_model`` instance (the gRPC unary path)."""
        if self.body_is_request and self.body_name is not None:
            return {self.body_name: request}
        values = {param.name: getattr(request, param.name) for param in self.params}
        if self.body_name is not None and self.streaming in ("unary", "server"):
            values[self.body_name] = getattr(request, self.body_name)
        return values


def inspect_endpoint(
    function: Callable[..., Any],
    *,
    method: HttpMethod,
    path: str,
    name: str | None = None,
    status_code: int | None = None,
    http: bool = True,
    grpc: bool = True,
    idempotent: bool | None = None,
    idempotency: IdempotencyMode | None = None,
) -> Endpoint:
    """Read ``function``'s signature into an ``Endpoint``.

    ``idempotency`` is ``Endpoint.idempotency``; None takes its default.

    Raises:
        ConfigurationError: a bad path, a path parameter the handler lacks,
            a parameter of a type that cannot travel in a URL, a body on a
            GET or DELETE, two bodies, Idempotency-Key storage asked of a
            stream; the message names the handler and says how to write it.
    """
    where = getattr(function, "__qualname__", repr(function))
    if not _PATH_SHAPE.match(path):
        raise ConfigurationError(
            f"endpoint {where}: path {path!r} must start with '/' and hold segments of "
            f"A-Z a-z 0-9 . _ ~ - or {{name}} placeholders, e.g. '/v1/orders/{{order_id}}'"
        )
    is_generator = inspect.isasyncgenfunction(function)
    if not (inspect.iscoroutinefunction(function) or is_generator):
        raise ConfigurationError(f"endpoint {where} must be an `async def` function")
    try:
        hints = get_type_hints(function)
    except NameError as exc:
        raise ConfigurationError(
            f"endpoint {where} has an annotation that cannot be resolved ({exc}); "
            f"import the type at module level"
        ) from exc
    in_path = _PATH_PARAM.findall(path)
    if len(set(in_path)) != len(in_path):
        raise ConfigurationError(f"endpoint {where}: path {path!r} repeats a placeholder")

    params: list[Param] = []
    body: tuple[str, type[BaseModel], bool] | None = None
    context_name: str | None = None
    dependencies: dict[str, type[Any]] = {}
    signature = inspect.signature(function)
    for parameter in signature.parameters.values():
        annotation = hints.get(parameter.name)
        if annotation is None:
            raise ConfigurationError(
                f"parameter {parameter.name!r} of endpoint {where} has no type annotation"
            )
        has_default = parameter.default is not inspect.Parameter.empty
        streamed = _stream_item(annotation)
        if annotation is CallContext:
            context_name = parameter.name
        elif streamed is not None or _is_model(annotation):
            model = streamed if streamed is not None else annotation
            if body is not None:
                raise ConfigurationError(
                    f"endpoint {where} has two bodies ({body[0]!r} and {parameter.name!r}); "
                    f"a call has one body: put both in one model"
                )
            body = (parameter.name, model, streamed is not None)
        elif parameter.name in in_path:
            _check_scalar(annotation, where, parameter.name, allow_none=False)
            params.append(Param(parameter.name, annotation, "path", True))
        elif _is_scalar(annotation):
            params.append(
                Param(
                    parameter.name,
                    annotation,
                    "query",
                    not has_default,
                    parameter.default if has_default else None,
                )
            )
        elif isinstance(annotation, type):
            dependencies[parameter.name] = annotation
        else:
            raise ConfigurationError(
                f"parameter {parameter.name!r} of endpoint {where} is annotated "
                f"{annotation!r}: use str, int, float, bool, UUID or an Enum (path or "
                f"query), a pydantic model (the body), CallContext, or a provided class"
            )
    missing = [p for p in in_path if p not in {param.name for param in params}]
    if missing:
        raise ConfigurationError(
            f"endpoint {where}: path {path!r} names {missing} but the handler has no "
            f"such scalar parameter; add `{missing[0]}: str` to its signature"
        )
    if body is not None and method not in BODY_METHODS:
        raise ConfigurationError(
            f"endpoint {where}: {method} carries no body, but parameter {body[0]!r} is a "
            f"model; use POST, PUT or PATCH, or take scalar query parameters"
        )

    returned = hints.get("return", type(None))
    server_stream = _stream_item(returned)
    if is_generator != (server_stream is not None):
        raise ConfigurationError(
            f"endpoint {where}: a server stream is an async generator annotated "
            f"`-> AsyncIterator[Model]`; write both or neither"
        )
    returns: type[BaseModel] | None
    if server_stream is not None:
        returns = server_stream
    elif returned is None or returned is type(None):
        returns = None
    elif _is_model(returned):
        returns = returned
    else:
        raise ConfigurationError(
            f"endpoint {where} returns {returned!r}: return a pydantic model (wrap a list "
            f"in one, e.g. `class Orders(BaseModel): items: list[Order]`) or None"
        )
    client_stream = body is not None and body[2]
    streaming: Streaming = (
        "bidi"
        if client_stream and server_stream
        else "client"
        if client_stream
        else "server"
        if server_stream
        else "unary"
    )
    if streaming in ("client", "bidi") and params:
        raise ConfigurationError(
            f"endpoint {where}: a client stream carries only its messages; move "
            f"{[p.name for p in params]} into the streamed model"
        )
    if streaming != "unary" and returns is None:
        raise ConfigurationError(f"endpoint {where}: a stream needs an item model")

    if idempotency is None:
        keyed = method in ("POST", "PATCH") and streaming == "unary"
        idempotency = "optional" if keyed else "off"
    elif idempotency not in ("off", "optional", "required"):
        raise ConfigurationError(
            f"endpoint {where}: idempotency={idempotency!r}; use 'off', 'optional' or 'required'"
        )
    elif idempotency != "off" and streaming != "unary":
        raise ConfigurationError(
            f"endpoint {where}: a {streaming} stream cannot take Idempotency-Key storage (its "
            f"body is not whole before the handler runs, nor its answer after); pass "
            f"idempotency='off' or make it unary"
        )
    rpc_name = name or _camel(function.__name__)
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", rpc_name):
        raise ConfigurationError(
            f"endpoint {where}: name {rpc_name!r} must be CamelCase letters and digits "
            f"(it is the gRPC method name)"
        )
    params_model = _params_model(rpc_name, params)
    request_model = _request_model(rpc_name, params, body, params_model)
    doc = inspect.getdoc(function) or ""
    summary, _, description = doc.partition("\n")
    return Endpoint(
        method=method,
        path=path,
        name=rpc_name,
        function=function,
        params=tuple(params),
        body_name=body[0] if body else None,
        body_model=body[1] if body else None,
        context_name=context_name,
        dependencies=dependencies,
        returns=returns,
        streaming=streaming,
        status_code=status_code or (204 if returns is None else 200),
        http=http,
        grpc=grpc,
        idempotent=method in IDEMPOTENT_METHODS if idempotent is None else idempotent,
        summary=summary.strip(),
        description=description.strip(),
        request_model=request_model,
        params_model=params_model,
        idempotency=idempotency,
    )


def _params_model(name: str, params: list[Param]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        p.name: (p.annotation, ... if p.required else p.default) for p in params
    }
    return create_model(f"{name}Params", **fields)


def _request_model(
    name: str,
    params: list[Param],
    body: tuple[str, type[BaseModel], bool] | None,
    params_model: type[BaseModel],
) -> type[BaseModel]:
    if body is not None and (body[2] or not params):
        return body[1]  # the body is the whole request (or each message of a stream)
    if body is None:
        return params_model if params else create_model(f"{name}Request")
    fields: dict[str, Any] = {
        p.name: (p.annotation, ... if p.required else p.default) for p in params
    }
    fields[body[0]] = (body[1], ...)
    return create_model(f"{name}Request", **fields)


def _camel(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_") if part)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _stream_item(annotation: Any) -> type[BaseModel] | None:
    """``Model`` for ``AsyncIterator[Model]`` / ``AsyncIterable`` / ``AsyncGenerator``."""
    origin = get_origin(annotation)
    streams = (
        collections.abc.AsyncIterator,
        collections.abc.AsyncIterable,
        collections.abc.AsyncGenerator,
    )
    if origin not in streams:
        return None
    args = get_args(annotation)
    if args and _is_model(args[0]):
        item: type[BaseModel] = args[0]
        return item
    raise ConfigurationError(f"a stream must carry a pydantic model, not {annotation!r}")


def _scalar_of(annotation: Any) -> tuple[Any, bool]:
    """The scalar inside ``X | None`` and whether None was allowed."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_scalar(annotation: Any) -> bool:
    inner, _ = _scalar_of(annotation)
    return isinstance(inner, type) and (inner in SCALAR_TYPES or issubclass(inner, enum.Enum))


def _check_scalar(annotation: Any, where: str, name: str, *, allow_none: bool) -> None:
    _, optional = _scalar_of(annotation)
    if not _is_scalar(annotation) or (optional and not allow_none):
        raise ConfigurationError(
            f"path parameter {name!r} of endpoint {where} is {annotation!r}: a path "
            f"segment is one str, int, float, bool, UUID or Enum value, never None"
        )
