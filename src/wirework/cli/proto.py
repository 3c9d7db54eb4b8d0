"""``wirework proto module:svc``: print the ``.proto`` a service's gRPC endpoints speak.

The file is derived from the pydantic models (``wirework.grpc.proto``), the
same derivation the server runs on, so a client built from it in any
language matches the server; redirect it to a file and run ``protoc``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from wirework.cli._common import EXIT_USAGE, describe, fail
from wirework.errors import ConfigurationError
from wirework.runner import load_service


def proto_command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:SERVICE",
            help="The service, as module:attribute (e.g. shop.orders:svc).",
            show_default=False,
        ),
    ],
) -> None:
    """Print the proto3 contract of a service's gRPC endpoints on stdout."""
    # Imported here so `wirework run` and the other commands never load grpcio.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from wirework.grpc.proto import render_proto

        text = render_proto(load_service(target))
    except ModuleNotFoundError as exc:
        fail(
            f"printing a .proto needs the grpc extra ({exc.name} is missing); "
            f"install it with: pip install 'wirework[grpc]'",
            code=EXIT_USAGE,
        )
    except ConfigurationError as exc:
        fail(describe(exc), code=EXIT_USAGE)
    sys.stdout.write(text)
    sys.stdout.flush()
