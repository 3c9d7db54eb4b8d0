"""The five servers of workload 11, one typed handler each, run as ``python -m bench.rpc_apps``.

The handler prices a quote: it reads ``{sku, qty, currency}`` and answers
``{sku, qty, unit_price, total, currency}``. Each server runs alone in its own
process (one core), so the bench's client has the other:

* ``wirework-rest``: ``@svc.post("/v1/quote")`` served by ``wirework.http.HttpServer``
  (uvicorn's httptools protocol plus wirework's header limits);
* ``fastapi``: the same pydantic models in a FastAPI route on the same uvicorn;
* ``starlette``: a plain Starlette handler (orjson in, orjson out, no validation);
* ``wirework-grpc``: the same wirework handler served by ``wirework.grpc``;
* ``grpcio``: a plain grpcio servicer on classes ``protoc`` generated from the
  ``.proto`` wirework emits, so both gRPC servers put the same bytes on the wire.

The three HTTP servers run uvicorn on uvloop with httptools and no access log;
both gRPC servers run grpc.aio on the standard asyncio loop.
The process writes its port to the file named on the command line once it
listens, and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from wirework.service import Service

PRICE = 2.5
KINDS = ("wirework-rest", "fastapi", "starlette", "wirework-grpc", "grpcio")
HTTP_KINDS = KINDS[:3]


class QuoteRequest(BaseModel):
    sku: str
    qty: int
    currency: str = "EUR"


class Quote(BaseModel):
    sku: str
    qty: int
    unit_price: float
    total: float
    currency: str


svc = Service("bench-quotes")


@svc.post("/v1/quote")
async def quote(request: QuoteRequest) -> Quote:
    return Quote(
        sku=request.sku,
        qty=request.qty,
        unit_price=PRICE,
        total=PRICE * request.qty,
        currency=request.currency,
    )


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/quote")
    async def fastapi_quote(request: QuoteRequest) -> Quote:
        return Quote(
            sku=request.sku,
            qty=request.qty,
            unit_price=PRICE,
            total=PRICE * request.qty,
            currency=request.currency,
        )

    return app


def starlette_app() -> Any:
    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def plain_quote(request: Request) -> Response:
        data = orjson.loads(await request.body())
        qty = data["qty"]
        answer = {
            "sku": data["sku"],
            "qty": qty,
            "unit_price": PRICE,
            "total": PRICE * qty,
            "currency": data.get("currency", "EUR"),
        }
        return Response(orjson.dumps(answer), media_type="application/json")

    return Starlette(routes=[Route("/v1/quote", plain_quote, methods=["POST"])])


def generated_modules(directory: Path) -> tuple[ModuleType, ModuleType]:
    """``protoc``'s Python classes for wirework's emitted ``.proto`` (messages, stubs)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    from wirework.grpc.proto import render_proto

    directory.mkdir(parents=True, exist_ok=True)
    proto = directory / "bench_quotes.proto"
    proto.write_text(render_proto(svc))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{directory}",
            f"-I{include}",
            f"--python_out={directory}",
            f"--grpc_python_out={directory}",
            str(proto),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {proto} (exit {code})")
    sys.path.insert(0, str(directory))
    return importlib.import_module("bench_quotes_pb2"), importlib.import_module(
        "bench_quotes_pb2_grpc"
    )


def announce(port_file: Path, port: int) -> None:
    """Tell the bench the port: written whole, then renamed, so it never reads half a number."""
    partial = port_file.with_suffix(".partial")
    partial.write_text(str(port))
    partial.rename(port_file)


async def serve_http(kind: str, port_file: Path, stop: asyncio.Event) -> None:
    import uvicorn

    if kind == "wirework-rest":
        # What ships: HttpServer, with the header limits and timeouts uvicorn lacks.
        from wirework.http import HttpServer, http_app

        async with HttpServer(http_app(svc)) as wirework_server:
            announce(port_file, wirework_server.port)
            await stop.wait()
        return
    app = fastapi_app() if kind == "fastapi" else starlette_app()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        loop="none",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    announce(port_file, port)
    await stop.wait()
    server.should_exit = True
    await task


async def serve_grpc(kind: str, port_file: Path, stop: asyncio.Event) -> None:
    import grpc  # type: ignore[import-untyped]

    if kind == "wirework-grpc":
        from wirework.grpc.server import GrpcServer

        async with GrpcServer(svc, host="127.0.0.1", port=0) as wirework_server:
            announce(port_file, wirework_server.port)
            await stop.wait()
        return
    messages, stubs = generated_modules(port_file.parent / "protoc")

    class Servicer(stubs.BenchQuotesServicer):  # type: ignore[name-defined,misc]
        async def Quote(self, request: Any, context: Any) -> Any:
            return messages.Quote(
                sku=request.sku,
                qty=request.qty,
                unit_price=PRICE,
                total=PRICE * request.qty,
                currency=request.currency,
            )

    server = grpc.aio.server()
    stubs.add_BenchQuotesServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce(port_file, port)
    await stop.wait()
    await server.stop(1.0)


async def main(kind: str, port_file: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if kind in HTTP_KINDS:
        await serve_http(kind, port_file, stop)
    else:
        await serve_grpc(kind, port_file, stop)


if __name__ == "__main__":
    kind_arg, port_arg = sys.argv[1], Path(sys.argv[2])
    if kind_arg not in KINDS:
        raise SystemExit(f"unknown server {kind_arg!r}; choose from {', '.join(KINDS)}")
    if kind_arg in HTTP_KINDS:
        import uvloop

        uvloop.run(main(kind_arg, port_arg))
    else:
        asyncio.run(main(kind_arg, port_arg))  # grpc.aio runs on the standard loop
