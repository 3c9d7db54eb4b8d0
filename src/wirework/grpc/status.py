"""How an error crosses gRPC, both ways: status code, details, trailing metadata.

The server answers a ``WireworkError`` with the class's ``grpc_code``, its
message as the status details, and two trailers:

* ``wirework-error-type``: ``error_name(cls)``, which a wirework caller
  rebuilds with ``rebuild_error`` (Nameko's registry idea);
* ``grpc-status-details-bin``: a ``google.rpc.Status`` (the richer error
  model every gRPC language reads) holding one ``google.rpc.ErrorInfo``
  with ``domain = "wirework"`` and the same type in its metadata, and for an
  invalid message a ``google.rpc.BadRequest`` with one field violation per
  bad field. These messages are described at run time here, so no
  grpcio-status dependency.

A caller without the type trailer (a foreign server) gets the ``CallError``
class of the status code, and ``RemoteError`` for codes no class claims.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, text_format  # type: ignore[import-untyped]

from wirework.errors import (
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    RemoteError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthenticatedError,
    WireworkError,
    rebuild_error,
)
from wirework.grpc.descriptors import load, message_class

ERROR_TYPE_KEY = "wirework-error-type"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "wirework"
TYPE_URL = "type.googleapis.com/google.rpc"

#: The class a bare status code becomes on the caller, when the server named none.
BY_CODE: dict[str, type[WireworkError]] = {
    "INVALID_ARGUMENT": BadRequestError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "ABORTED": ConflictError,
    "FAILED_PRECONDITION": PreconditionFailedError,
    "RESOURCE_EXHAUSTED": TooManyRequestsError,
    "UNAVAILABLE": ServiceUnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}

_RPC_STATUS = """
name: "google/rpc/status.proto" package: "google.rpc" syntax: "proto3"
dependency: "google/protobuf/any.proto"
message_type {
  name: "Status"
  field { name: "code" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 json_name: "code" }
  field { name: "message" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "message" }
  field { name: "details" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.protobuf.Any" json_name: "details" }
}
message_type {
  name: "BadRequest"
  field { name: "field_violations" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.rpc.BadRequest.FieldViolation" json_name: "fieldViolations" }
  nested_type {
    name: "FieldViolation"
    field { name: "field" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "field" }
    field { name: "description" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING
            json_name: "description" }
  }
}
message_type {
  name: "ErrorInfo"
  field { name: "reason" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "reason" }
  field { name: "domain" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "domain" }
  field { name: "metadata" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.rpc.ErrorInfo.MetadataEntry" json_name: "metadata" }
  nested_type {
    name: "MetadataEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "key" }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "value" }
    options { map_entry: true }
  }
}
"""


def _status_classes() -> tuple[Any, Any, Any]:
    file = text_format.Parse(_RPC_STATUS, descriptor_pb2.FileDescriptorProto())
    pool = load([])
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(any_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(file)
    return (
        message_class(pool, "google.rpc.Status"),
        message_class(pool, "google.rpc.ErrorInfo"),
        message_class(pool, "google.rpc.BadRequest"),
    )


RpcStatus, ErrorInfo, BadRequest = _status_classes()


def reason(cls: type[BaseException]) -> str:
    """``NotFoundError`` → ``NOT_FOUND_ERROR``: ErrorInfo's UPPER_SNAKE reason."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__).upper()


def status_details(
    code: int,
    message: str,
    error_type: str,
    cls: type[BaseException],
    violations: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The ``grpc-status-details-bin`` value: a ``google.rpc.Status`` with an ErrorInfo,
    and a ``google.rpc.BadRequest`` listing ``violations`` (field, problem) when given."""
    info = ErrorInfo(reason=reason(cls), domain=ERROR_DOMAIN, metadata={"type": error_type})
    status = RpcStatus(code=code, message=message)
    status.details.add(type_url=f"{TYPE_URL}.ErrorInfo", value=info.SerializeToString())
    if violations:
        request = BadRequest(
            field_violations=[{"field": field, "description": text} for field, text in violations]
        )
        status.details.add(type_url=f"{TYPE_URL}.BadRequest", value=request.SerializeToString())
    data: bytes = status.SerializeToString()
    return data


def error_from_status(code: str, details: str, metadata: Any) -> WireworkError:
    """The error a caller raises for a failed call (``code`` is a ``StatusCode`` name).

    The ``wirework-error-type`` trailer wins (the class is rebuilt, or becomes
    ``RemoteError`` if this process does not know it); else the code's class
    from ``BY_CODE``; else ``RemoteError("grpc.<CODE>", details)``.
    """
    error_type = _metadata_value(metadata, ERROR_TYPE_KEY)
    if error_type:
        return rebuild_error(error_type, details)
    cls = BY_CODE.get(code)
    if cls is None:
        return RemoteError(f"grpc.{code}", details or code)
    error = cls.__new__(cls)
    Exception.__init__(error, details or code)
    return error


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item_key, value in metadata or ():
        if item_key == key and isinstance(value, str):
            return value
    return None
