"""pydantic models ↔ protobuf bytes at runtime, through the derived descriptors.

Converters are made once per message type:

* **encode**: the model's ``__dict__`` (its field values, no ``model_dump()``
  walk) with only the fields that need it converted (enum → number, UUID →
  text, nested model → dict), handed to the upb message constructor in one
  call, which does the per-field work in C;
* **decode**: one small closure per field reads the parsed message into a
  plain dict (presence rules applied), then one ``model_validate``: the
  model's own constraints (``Field(gt=0)``, lengths, patterns) hold on gRPC
  exactly as on REST.

``docs/grpc.md`` has the measurements behind these choices (setting fields one
by one costs the same as the constructor; reading through ``ListFields()`` was
slower than reading field by field) and how to repeat them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError as ProtobufDecodeError  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError

from wirework.errors import BadRequestError
from wirework.grpc.descriptors import file_descriptor, load, message_class
from wirework.grpc.proto import EMPTY, EnumSpec, FieldSpec, ProtoFile

M = TypeVar("M", bound=BaseModel)


class InvalidMessageError(BadRequestError):
    """A gRPC message, or a call's arguments, break their model (``INVALID_ARGUMENT``).

    ``violations`` holds ``(field path, problem)`` pairs, which the server also
    sends as a ``google.rpc.BadRequest`` detail; on an error rebuilt from a
    remote reply it is empty and the message carries the same text.
    """

    violations: tuple[tuple[str, str], ...] = ()

    def __init__(self, what: str, exc: ValidationError) -> None:
        self.violations = tuple(
            (".".join(str(part) for part in error["loc"]) or "(message)", error["msg"])
            for error in exc.errors(include_url=False)
        )
        problems = "; ".join(f"{field}: {problem}" for field, problem in self.violations)
        super().__init__(f"invalid {what}: {problems}")


Convert = Callable[[Any], Any]
Wire = Callable[[Any], dict[str, Any]]
"""``wire(model)``: the constructor keywords of the model's message (nested as dicts)."""
Read = Callable[[Any, dict[str, Any]], None]
"""``read(message, into)``: put one field of a parsed message into a dict, if present."""
Build = Callable[[Any], dict[str, Any]]
"""``build(message)``: the dict of a parsed message, for ``model_validate``."""


class MessageCodec(Generic[M]):
    """Encodes one model to its message's bytes and decodes bytes back to a validated model.

    Attributes:
        name: the message's full proto name (``wirework.orders.Order``).
        model: the pydantic model (None for ``google.protobuf.Empty``).
        message_class: the runtime upb class.
    """

    __slots__ = ("_build", "_wire", "message_class", "model", "name")

    def __init__(
        self, name: str, model: type[M] | None, message_class: Any, wire: Wire, build: Build
    ) -> None:
        self.name = name
        self.model = model
        self.message_class = message_class
        self._wire = wire
        self._build = build

    def to_message(self, value: M | None) -> Any:
        """The upb message of ``value`` (an empty one for None)."""
        if value is None:
            return self.message_class()
        return self.message_class(**self._wire(value))

    def encode(self, value: M | None) -> bytes:
        """The wire bytes of ``value`` (None only for ``Empty``)."""
        if value is None:
            return b""
        data: bytes = self.message_class(**self._wire(value)).SerializeToString()
        return data

    def from_message(self, message: Any) -> M:
        """A validated model from a parsed message.

        Raises:
            InvalidMessageError: the values break the model; it names every bad field.
        """
        if self.model is None:
            return None  # type: ignore[return-value]  # Empty carries nothing
        try:
            return self.model.model_validate(self._build(message), by_name=True, by_alias=False)
        except ValidationError as exc:
            raise InvalidMessageError(self.name, exc) from None

    def decode(self, data: bytes) -> M:
        """A validated model from wire bytes.

        Raises:
            BadRequestError: the bytes are not this message, or its values break the model.
        """
        try:
            message = self.message_class.FromString(data)
        except ProtobufDecodeError as exc:
            raise BadRequestError(
                f"the bytes sent are not a valid {self.name} protobuf message ({exc}); "
                f"build the request from the service's .proto (wirework proto module:svc)"
            ) from None
        return self.from_message(message)


class Codec:
    """Every message of one ``ProtoFile``: runtime classes and their converters."""

    def __init__(self, proto: ProtoFile) -> None:
        self.proto = proto
        self.file = file_descriptor(proto)
        self.pool = load([self.file])
        self._wires: dict[str, Wire] = {}
        self._builds: dict[str, Build] = {}
        self._codecs: dict[str, MessageCodec[Any]] = {}
        self._enums: dict[str, tuple[dict[Any, int], dict[int, Any]]] = {
            name: _enum_tables(spec) for name, spec in proto.enums.items()
        }

    def codec(self, name: str) -> MessageCodec[Any]:
        """The codec of message ``name`` (a name inside the package, or ``EMPTY``)."""
        codec = self._codecs.get(name)
        if codec is None:
            full = self.proto.full_name(name)
            cls = message_class(self.pool, full)
            if name == EMPTY:
                codec = MessageCodec(full, None, cls, _nothing, _nothing)
            else:
                model = self.proto.messages[name].model
                codec = MessageCodec(full, model, cls, self._wire(name), self._build(name))
            self._codecs[name] = codec
        return codec

    # -- encoding: model → constructor keywords -------------------------------------

    def _wire(self, name: str) -> Wire:
        wire = self._wires.get(name)
        if wire is not None:
            return wire
        spec = self.proto.messages[name]
        model = spec.model
        names = tuple(field.name for field in spec.fields)
        converts: list[tuple[str, Convert]] = []

        def wire_message(value: Any) -> dict[str, Any]:
            values: dict[str, Any] = value.__dict__
            if type(value) is model:
                out = values.copy()
            else:  # a subclass may carry fields the message does not have
                out = {field: values[field] for field in names}
            for field, convert in converts:
                item = out[field]
                if item is not None:
                    out[field] = convert(item)
            return out

        self._wires[name] = wire_message  # before the fields: a model may contain itself
        for field in spec.fields:
            convert = self._to_wire(field)
            if convert is not None:
                converts.append((field.name, convert))
        return wire_message

    def _to_wire(self, spec: FieldSpec) -> Convert | None:
        """How one field's Python value becomes a constructor value; None: as it is."""
        kind = spec.value.convert
        one: Convert
        if kind == "plain":
            return None
        if kind == "text":
            one = str
        elif kind == "isoformat":
            one = _isoformat
        elif kind == "enum":
            one = self._enums[spec.value.proto_type][0].__getitem__
        else:
            one = self._wire(spec.value.proto_type)
        if spec.map_key is not None:
            return lambda values: {key: one(item) for key, item in values.items()}
        if spec.label == "repeated":
            return lambda values: [one(item) for item in values]
        return one

    # -- decoding: message → dict (then one model_validate) -----------------------

    def _build(self, name: str) -> Build:
        build = self._builds.get(name)
        if build is not None:
            return build
        reads: list[Read] = []

        def build_message(message: Any) -> dict[str, Any]:
            into: dict[str, Any] = {}
            for read in reads:
                read(message, into)
            return into

        self._builds[name] = build_message
        reads.extend(self._read_field(spec) for spec in self.proto.messages[name].fields)
        return build_message

    def _read_field(self, spec: FieldSpec) -> Read:
        name, nullable = spec.name, spec.nullable
        if spec.value.convert == "message":
            sub = self._build(spec.value.proto_type)
            if spec.map_key is not None:

                def read_map_of_messages(message: Any, into: dict[str, Any]) -> None:
                    into[name] = {key: sub(item) for key, item in getattr(message, name).items()}

                return read_map_of_messages
            if spec.label == "repeated":

                def read_repeated_messages(message: Any, into: dict[str, Any]) -> None:
                    into[name] = [sub(item) for item in getattr(message, name)]

                return read_repeated_messages

            def read_message(message: Any, into: dict[str, Any]) -> None:
                if message.HasField(name):
                    into[name] = sub(getattr(message, name))
                elif nullable:
                    into[name] = None

            return read_message
        if spec.value.convert == "enum":
            return self._read_enum(spec)
        if spec.map_key is not None:

            def read_map(message: Any, into: dict[str, Any]) -> None:
                into[name] = dict(getattr(message, name))

            return read_map
        if spec.label == "repeated":

            def read_repeated(message: Any, into: dict[str, Any]) -> None:
                into[name] = list(getattr(message, name))

            return read_repeated
        if spec.label == "optional":

            def read_optional(message: Any, into: dict[str, Any]) -> None:
                if message.HasField(name):
                    into[name] = getattr(message, name)
                elif nullable:
                    into[name] = None

            return read_optional

        def read_plain(message: Any, into: dict[str, Any]) -> None:
            into[name] = getattr(message, name)

        return read_plain

    def _read_enum(self, spec: FieldSpec) -> Read:
        """0 (UNSPECIFIED) reads as absent; an unknown number goes on, for pydantic to refuse."""
        name, nullable = spec.name, spec.nullable
        values = self._enums[spec.value.proto_type][1]

        def member(number: int) -> Any:
            return values.get(number, number)

        if spec.map_key is not None:

            def read_map(message: Any, into: dict[str, Any]) -> None:
                into[name] = {key: member(n) for key, n in getattr(message, name).items()}

            return read_map
        if spec.label == "repeated":

            def read_repeated(message: Any, into: dict[str, Any]) -> None:
                into[name] = [member(n) for n in getattr(message, name)]

            return read_repeated

        def read_one(message: Any, into: dict[str, Any]) -> None:
            number = getattr(message, name)
            if number:
                into[name] = member(number)
            elif nullable:
                into[name] = None

        return read_one


def _enum_tables(spec: EnumSpec) -> tuple[dict[Any, int], dict[int, Any]]:
    """Member (or its value) → number, and number → the member's value (what pydantic reads)."""
    numbers: dict[Any, int] = {}
    values: dict[int, Any] = {}
    for _, number, member in spec.values:
        if isinstance(member, enum.Enum):
            numbers[member] = number
            numbers.setdefault(member.value, number)  # models with use_enum_values=True
            values[number] = member.value
    return numbers, values


def _isoformat(value: Any) -> str:
    text: str = value.isoformat()
    return text


def _nothing(value: Any) -> dict[str, Any]:
    return {}
