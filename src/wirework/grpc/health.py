"""The standard ``grpc.health.v1.Health/Check``, described at run time.

Every ``GrpcServer`` answers it, so ``grpc_health_probe``, Kubernetes'
``grpc`` probes and load balancers see a wirework server as they see any
other (grpcio-health-checking is not needed). ``Check`` with an empty
service name asks about the server; with a service's full name
(``wirework.orders.Orders``) about that service; an unknown name gets
``NOT_FOUND``, as the protocol says. ``Watch`` is not offered
(``UNIMPLEMENTED``): probes poll ``Check``.
"""

from __future__ import annotations

from typing import Any

import grpc  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, text_format  # type: ignore[import-untyped]

from wirework.grpc.descriptors import load, message_class

HEALTH_SERVICE = "grpc.health.v1.Health"
SERVING = 1
NOT_SERVING = 2

_HEALTH = """
name: "grpc/health/v1/health.proto" package: "grpc.health.v1" syntax: "proto3"
message_type {
  name: "HealthCheckRequest"
  field { name: "service" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING json_name: "service" }
}
message_type {
  name: "HealthCheckResponse"
  field { name: "status" number: 1 label: LABEL_OPTIONAL type: TYPE_ENUM
          type_name: ".grpc.health.v1.HealthCheckResponse.ServingStatus" json_name: "status" }
  enum_type {
    name: "ServingStatus"
    value { name: "UNKNOWN" number: 0 }
    value { name: "SERVING" number: 1 }
    value { name: "NOT_SERVING" number: 2 }
    value { name: "SERVICE_UNKNOWN" number: 3 }
  }
}
"""


def _classes() -> tuple[Any, Any]:
    pool = load([text_format.Parse(_HEALTH, descriptor_pb2.FileDescriptorProto())])
    return (
        message_class(pool, "grpc.health.v1.HealthCheckRequest"),
        message_class(pool, "grpc.health.v1.HealthCheckResponse"),
    )


HealthCheckRequest, HealthCheckResponse = _classes()


class Health:
    """Serving status per service name (``""`` is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}

    def set(self, service: str, status: int) -> None:
        self._status[service] = status

    def set_all(self, status: int) -> None:
        for service in self._status:
            self._status[service] = status

    async def check(self, data: bytes, context: Any) -> bytes:
        request = HealthCheckRequest.FromString(data)
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no service {request.service!r} on this server"
            )
        response: bytes = HealthCheckResponse(status=status).SerializeToString()
        return response

    def handlers(self) -> dict[str, Any]:
        """The method handlers to register under ``HEALTH_SERVICE``."""
        return {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
