"""Runtime protobuf descriptors for a derived ``ProtoFile``: no generated code.

The same ``ProtoFile`` that ``render`` prints is turned here into a
``FileDescriptorProto`` and loaded into a private ``DescriptorPool`` (one per
derived file, so two services, or two versions of one in a test, never clash
in protobuf's global pool); ``GetMessageClass`` then gives real upb message
classes, which parse and serialise in C.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    message_factory,
)

from wirework.grpc.proto import EMPTY_IMPORT, FieldSpec, MessageSpec, ProtoFile

_Field = descriptor_pb2.FieldDescriptorProto
_TYPES: dict[str, int] = {
    "string": _Field.TYPE_STRING,
    "bytes": _Field.TYPE_BYTES,
    "int64": _Field.TYPE_INT64,
    "int32": _Field.TYPE_INT32,
    "double": _Field.TYPE_DOUBLE,
    "bool": _Field.TYPE_BOOL,
}


def file_descriptor(proto: ProtoFile) -> Any:
    """The ``FileDescriptorProto`` that ``protoc`` would make of ``render(proto)``."""
    file = descriptor_pb2.FileDescriptorProto(
        name=proto.file_name, package=proto.package, syntax="proto3"
    )
    if proto.uses_empty:
        file.dependency.append(EMPTY_IMPORT)
    service = file.service.add(name=proto.service)
    for rpc in proto.rpcs:
        method = service.method.add(
            name=rpc.endpoint.name,
            input_type="." + proto.full_name(rpc.request),
            output_type="." + proto.full_name(rpc.response),
        )
        # Set only when true, as protoc does (descriptor.proto has proto2 presence).
        if rpc.streaming in ("client", "bidi"):
            method.client_streaming = True
        if rpc.streaming in ("server", "bidi"):
            method.server_streaming = True
    for spec in proto.enums.values():
        enum = file.enum_type.add(name=spec.name)
        for name, number, _ in spec.values:
            enum.value.add(name=name, number=number)
    for message in proto.messages.values():
        _message(file.message_type.add(), message, proto)
    return file


def _message(out: Any, message: MessageSpec, proto: ProtoFile) -> None:
    out.name = message.name
    for spec in message.fields:
        field = out.field.add(name=spec.name, number=spec.number, json_name=_json(spec.name))
        if spec.map_key is not None:
            entry = _map_entry(out, spec, proto)
            field.label = _Field.LABEL_REPEATED
            field.type = _Field.TYPE_MESSAGE
            field.type_name = f".{proto.full_name(message.name)}.{entry}"
            continue
        _value(field, spec, proto)
        field.label = _Field.LABEL_REPEATED if spec.label == "repeated" else _Field.LABEL_OPTIONAL
        if spec.label == "optional":
            # proto3 `optional` is a synthetic one-field oneof named `_<field>`.
            field.proto3_optional = True
            field.oneof_index = len(out.oneof_decl)
            out.oneof_decl.add(name=f"_{spec.name}")


def _value(field: Any, spec: FieldSpec, proto: ProtoFile) -> None:
    if spec.value.convert == "message":
        field.type = _Field.TYPE_MESSAGE
        field.type_name = "." + proto.full_name(spec.value.proto_type)
    elif spec.value.convert == "enum":
        field.type = _Field.TYPE_ENUM
        field.type_name = "." + proto.full_name(spec.value.proto_type)
    else:
        field.type = _TYPES[spec.value.proto_type]


def _map_entry(out: Any, spec: FieldSpec, proto: ProtoFile) -> str:
    """Add the nested ``<Field>Entry`` message protoc makes for a ``map`` field."""
    name = "".join(part[:1].upper() + part[1:] for part in spec.name.split("_")) + "Entry"
    entry = out.nested_type.add(name=name)
    entry.options.map_entry = True
    key = entry.field.add(name="key", number=1, json_name="key", label=_Field.LABEL_OPTIONAL)
    key.type = _TYPES[spec.map_key or "string"]
    value = entry.field.add(name="value", number=2, json_name="value", label=_Field.LABEL_OPTIONAL)
    _value(value, spec, proto)
    return name


def _json(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def load(files: list[Any]) -> Any:
    """A fresh ``DescriptorPool`` holding ``files`` (and ``empty.proto`` when one needs it)."""
    pool = descriptor_pool.DescriptorPool()
    if any(EMPTY_IMPORT in file.dependency for file in files):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(empty_pb2.DESCRIPTOR.serialized_pb))
    for file in files:
        pool.Add(file)
    return pool


def message_class(pool: Any, full_name: str) -> Any:
    """The upb message class of ``full_name`` in ``pool``."""
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
