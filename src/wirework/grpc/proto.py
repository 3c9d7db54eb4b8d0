"""A proto3 contract derived from a service's endpoints and their pydantic models.

``derive(service)`` reads every endpoint with ``grpc=True`` once into a
``ProtoFile``: one ``service`` with an rpc per endpoint, one message per
model, one enum per ``enum.Enum``. ``render_proto`` prints it as a
``.proto`` that ``protoc`` compiles (for clients in other languages), and
``wirework.grpc.codec`` builds the runtime descriptors from the same
``ProtoFile``, so what the server speaks and what the file says cannot drift.

How Python types map (anything else is a ``ConfigurationError`` naming the
model and field):

* ``str`` → string, ``int`` → int64, ``float`` → double, ``bool`` → bool,
  ``bytes`` → bytes; a ``Literal`` of strings or ints → string or int64.
* ``UUID``, ``Decimal``, ``datetime``, ``date``, ``time`` → string, in the
  same text form the REST binding's JSON uses (ISO 8601 for times). Not
  ``google.protobuf.Timestamp``: a Timestamp drops the UTC offset an aware
  datetime carries, and one text form for both bindings keeps a value
  identical whichever way it travelled.
* a pydantic model → a message; ``list[X]`` → ``repeated X``;
  ``dict[str | int | bool, X]`` → ``map``.
* ``enum.Enum`` (StrEnum, IntEnum, any) → an enum whose zero value is
  ``<ENUM>_UNSPECIFIED`` (proto3 needs a zero, and a zero that means "not
  sent" keeps a forgotten field from passing as the first member); members
  are numbered 1.. in declaration order (an IntEnum's own values would clash
  with that zero and with renumbering on reorder, so they travel as names).
* ``X | None`` and any scalar field with a default → proto3 ``optional``
  (explicit presence): an absent ``X | None`` field reads as None, any other
  absent field as the model's default, never as ``0`` or ``""``.

Field numbers follow declaration order from 1: adding a field at the end of
a model keeps old numbers, and reordering fields is a breaking change (as in
any hand-written ``.proto``).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import re
import types
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from wirework.errors import ConfigurationError
from wirework.service.endpoints import Endpoint, Streaming
from wirework.service.service import Service

EMPTY = "google.protobuf.Empty"
EMPTY_IMPORT = "google/protobuf/empty.proto"

#: How a field's Python value becomes its proto value: kept on the field so the
#: codec can pick a converter without looking at the annotation again.
Convert = Literal["plain", "text", "isoformat", "enum", "message"]

_SCALARS: tuple[tuple[type, str, Convert], ...] = (
    (bool, "bool", "plain"),  # before int: bool is an int subclass
    (int, "int64", "plain"),
    (float, "double", "plain"),
    (str, "string", "plain"),
    (bytes, "bytes", "plain"),
    (uuid.UUID, "string", "text"),
    (decimal.Decimal, "string", "text"),
    (datetime.datetime, "string", "isoformat"),  # before date: datetime is a date subclass
    (datetime.date, "string", "isoformat"),
    (datetime.time, "string", "isoformat"),
)
_MAP_KEYS = {str: "string", int: "int64", bool: "bool"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Value:
    """What one value of a field is: its proto type and how it converts.

    ``proto_type`` is a scalar name (``string``) or, for ``enum`` and
    ``message``, the type's name inside the package; ``python`` is the enum
    or model class for those two, else the scalar Python type.
    """

    proto_type: str
    convert: Convert
    python: Any


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a message: number, cardinality and value type."""

    name: str
    number: int
    value: Value
    label: Literal["", "optional", "repeated"] = ""
    map_key: str | None = None
    """The key's proto scalar type when the field is a ``map``."""
    nullable: bool = False
    """``X | None``: an absent field reads as None (our encoder omits only None)."""


@dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    model: type[BaseModel]
    fields: tuple[FieldSpec, ...]


@dataclass(frozen=True, slots=True)
class EnumSpec:
    """An enum: ``values`` are (proto name, number, Python member); 0 is UNSPECIFIED."""

    name: str
    python: type[enum.Enum]
    values: tuple[tuple[str, int, enum.Enum | None], ...]


@dataclass(frozen=True, slots=True)
class RpcSpec:
    endpoint: Endpoint
    request: str
    response: str
    streaming: Streaming


@dataclass(slots=True)
class ProtoFile:
    """Everything one service's ``.proto`` holds, in the order it is printed."""

    package: str
    service: str
    rpcs: list[RpcSpec] = field(default_factory=list)
    messages: dict[str, MessageSpec] = field(default_factory=dict)
    enums: dict[str, EnumSpec] = field(default_factory=dict)
    uses_empty: bool = False

    @property
    def file_name(self) -> str:
        return self.package.replace(".", "/") + ".proto"

    def full_name(self, name: str) -> str:
        return name if name.startswith("google.") else f"{self.package}.{name}"


def package_name(service_name: str) -> str:
    """``wirework.<name>``, ``-`` and ``.`` as ``_``: a package segment is an identifier."""
    return "wirework." + re.sub(r"[^A-Za-z0-9_]", "_", service_name)


def service_name(service_name: str) -> str:
    """``orders-api`` → ``OrdersApi``: the proto ``service``'s name."""
    parts = re.split(r"[^A-Za-z0-9]+", service_name)
    name = "".join(part[:1].upper() + part[1:] for part in parts if part)
    return name if name[:1].isalpha() else f"S{name}"


def derive(service: Service) -> ProtoFile:
    """The proto contract of ``service``'s gRPC endpoints.

    Raises:
        ConfigurationError: a model field whose type has no protobuf form, two
            different classes with one name, or a service without gRPC endpoints.
    """
    return derive_endpoints(service.name, service.endpoints)


def derive_endpoints(name: str, endpoints: Iterable[Endpoint]) -> ProtoFile:
    """The proto contract of the service ``name`` made of ``endpoints`` (those with ``grpc``).

    Raises:
        ConfigurationError: as ``derive``.
    """
    proto = ProtoFile(package=package_name(name), service=service_name(name))
    endpoints = [endpoint for endpoint in endpoints if endpoint.grpc]
    if not endpoints:
        raise ConfigurationError(
            f"service {name!r} has no gRPC endpoints; declare one with "
            f"@svc.get/post/...(path) (grpc=True is the default)"
        )
    builder = _Builder(proto)
    for endpoint in endpoints:
        # A model the endpoint synthesised from its parameters is named after the
        # rpc (`GetOrderRequest`), as a person writing the .proto would name it.
        synthesised = endpoint.request_model is not endpoint.body_model
        request = builder.message(
            endpoint.request_model, f"{endpoint.name}Request" if synthesised else None
        )
        if endpoint.returns is None:
            response = EMPTY
            proto.uses_empty = True
        else:
            response = builder.message(endpoint.returns)
        proto.rpcs.append(RpcSpec(endpoint, request, response, endpoint.streaming))
    return proto


class _Builder:
    """Walks models depth-first, naming each model and enum once."""

    def __init__(self, proto: ProtoFile) -> None:
        self.proto = proto
        self.names: dict[str, type] = {}
        self.service = proto.service
        self.visiting: set[type[BaseModel]] = set()

    def _claim(self, kind: type, name: str | None = None) -> tuple[str, bool]:
        """The proto name for ``kind`` and whether it was already claimed by it."""
        name = name or "".join(part for part in re.split(r"[^A-Za-z0-9_]", kind.__name__) if part)
        if name == self.service:
            raise ConfigurationError(
                f"{_where(kind)} would be proto type {name!r}, the name of the service itself "
                f"in package {self.proto.package}; rename the class"
            )
        owner = self.names.get(name)
        if owner is not None and owner is not kind:
            raise ConfigurationError(
                f"{_where(owner)} and {_where(kind)} would both be proto type {name!r} in "
                f"package {self.proto.package}; rename one of the classes"
            )
        self.names[name] = kind
        return name, owner is kind

    def message(self, model: type[BaseModel], name: str | None = None) -> str:
        name, known = self._claim(model, name)
        if known or model in self.visiting:
            return name
        self.visiting.add(model)
        fields = tuple(
            self._field(model, field_name, number, info.annotation, not info.is_required())
            for number, (field_name, info) in enumerate(model.model_fields.items(), start=1)
        )
        self.visiting.discard(model)
        self.proto.messages[name] = MessageSpec(name, model, fields)
        return name

    def enum(self, kind: type[enum.Enum]) -> str:
        name, known = self._claim(kind)
        if known:
            return name
        prefix = _upper_snake(name)
        values: list[tuple[str, int, enum.Enum | None]] = [(f"{prefix}_UNSPECIFIED", 0, None)]
        for number, member in enumerate(kind, start=1):
            values.append((f"{prefix}_{_upper_snake(member.name)}", number, member))
        self.proto.enums[name] = EnumSpec(name, kind, tuple(values))
        return name

    def _field(
        self, model: type[BaseModel], name: str, number: int, annotation: Any, has_default: bool
    ) -> FieldSpec:
        where = f"field {name!r} of model {_where(model)}"
        if not _IDENTIFIER.fullmatch(name):
            raise ConfigurationError(f"{where}: the name is not a proto identifier")
        annotation = _strip_annotated(annotation)
        inner, nullable = _optional_of(annotation)
        origin = get_origin(inner)
        if origin is list:
            if nullable:
                raise ConfigurationError(
                    f"{where} is {annotation!r}: a repeated field cannot be absent in proto3; "
                    f"write `list[X] = []` (an empty list) instead of `list[X] | None`"
                )
            (item,) = get_args(inner) or (Any,)
            return FieldSpec(name, number, self._value(item, where), "repeated")
        if origin is dict:
            if nullable:
                raise ConfigurationError(
                    f"{where} is {annotation!r}: a map cannot be absent in proto3; "
                    f"write `dict[K, V] = {{}}` instead of `dict[K, V] | None`"
                )
            key, item = get_args(inner) or (Any, Any)
            key_type = _MAP_KEYS.get(_strip_annotated(key))
            if key_type is None:
                raise ConfigurationError(
                    f"{where} is {annotation!r}: a proto map key is str, int or bool"
                )
            return FieldSpec(name, number, self._value(item, where), "repeated", key_type)
        value = self._value(inner, where)
        label: Literal["", "optional"] = ""
        if value.convert != "message" and (nullable or has_default):
            label = "optional"
        return FieldSpec(name, number, value, label, nullable=nullable)

    def _value(self, annotation: Any, where: str) -> Value:
        annotation = _strip_annotated(annotation)
        if get_origin(annotation) is Literal:
            choices = get_args(annotation)
            if all(isinstance(choice, str) for choice in choices):
                return Value("string", "plain", str)
            if all(type(choice) is int for choice in choices):
                return Value("int64", "plain", int)
        elif isinstance(annotation, type):
            if issubclass(annotation, BaseModel):
                return Value(self.message(annotation), "message", annotation)
            if issubclass(annotation, enum.Enum):
                return Value(self.enum(annotation), "enum", annotation)
            for python, proto_type, convert in _SCALARS:
                if issubclass(annotation, python):
                    return Value(proto_type, convert, python)
        raise ConfigurationError(
            f"{where} is {annotation!r}, which has no protobuf form; use str, int, float, "
            f"bool, bytes, UUID, Decimal, datetime, an Enum, a pydantic model, list[X], "
            f"dict[str, X] or X | None (a list or map holds no None and no nested list)"
        )


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _optional_of(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            return _strip_annotated(rest[0]), len(rest) < len(args)
    return annotation, False


def _upper_snake(name: str) -> str:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[^A-Za-z0-9]+", "_", spaced).strip("_").upper()


def _where(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def render_proto(service: Service) -> str:
    """The ``.proto`` text of ``service``'s gRPC endpoints (see ``derive``)."""
    return render(derive(service))


def render(proto: ProtoFile) -> str:
    """Print a derived ``ProtoFile`` as proto3 source."""
    lines = [
        "// Generated by wirework from the service's pydantic models; do not edit.",
        'syntax = "proto3";',
        "",
        f"package {proto.package};",
        "",
    ]
    if proto.uses_empty:
        lines += [f'import "{EMPTY_IMPORT}";', ""]
    lines.append(f"service {proto.service} {{")
    rpc_names = {rpc.endpoint.name for rpc in proto.rpcs}

    def type_name(name: str) -> str:
        # Inside a service, `PlaceOrder` would resolve to the rpc of that name:
        # a message named like an rpc is written fully qualified.
        return f".{proto.full_name(name)}" if name in rpc_names else name

    for rpc in proto.rpcs:
        client = "stream " if rpc.streaming in ("client", "bidi") else ""
        server = "stream " if rpc.streaming in ("server", "bidi") else ""
        request, response = type_name(rpc.request), type_name(rpc.response)
        for line in _comment(rpc.endpoint.summary):
            lines.append(f"  {line}")
        lines.append(f"  rpc {rpc.endpoint.name}({client}{request}) returns ({server}{response});")
    lines += ["}", ""]
    for enum_spec in proto.enums.values():
        lines.append(f"enum {enum_spec.name} {{")
        lines += [f"  {name} = {number};" for name, number, _ in enum_spec.values]
        lines += ["}", ""]
    for message in proto.messages.values():
        lines.append(f"message {message.name} {{")
        for spec in message.fields:
            if spec.map_key is not None:
                kind = f"map<{spec.map_key}, {spec.value.proto_type}>"
                lines.append(f"  {kind} {spec.name} = {spec.number};")
            else:
                label = f"{spec.label} " if spec.label else ""
                lines.append(f"  {label}{spec.value.proto_type} {spec.name} = {spec.number};")
        lines += ["}", ""]
    return "\n".join(lines)


def _comment(summary: str) -> list[str]:
    return [f"// {summary}"] if summary else []
