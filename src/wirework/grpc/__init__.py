"""The gRPC binding: a service's endpoints over grpc.aio, from a ``.proto`` derived from its models.

::

    server = GrpcServer(orders, port=50051)          # serve
    client = GrpcClient(orders, address="127.0.0.1:50051")
    order = await client.call(get_order, order_id=oid)  # typed by the handler
    print(render_proto(orders))                       # what `wirework proto` prints

No generated code: the runtime descriptors come from the same derivation as
the printed ``.proto`` (``proto``, ``descriptors``, ``codec``).
"""

try:
    import google.protobuf  # type: ignore[import-untyped]  # noqa: F401
    import grpc  # type: ignore[import-untyped]  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(
        f"wirework.grpc needs grpcio and protobuf ({exc.name} is missing); "
        f"install them with: pip install 'wirework[grpc]'",
        name=exc.name,
    ) from exc

from wirework.grpc.client import GrpcClient as GrpcClient
from wirework.grpc.proto import render_proto as render_proto
from wirework.grpc.server import GrpcLimits as GrpcLimits
from wirework.grpc.server import GrpcServer as GrpcServer

__all__ = ["GrpcClient", "GrpcLimits", "GrpcServer", "render_proto"]
