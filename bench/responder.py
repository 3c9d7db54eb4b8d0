"""A responder process for the request-reply workloads: ``python -m bench.responder``.

``--side wirework`` runs a ``Service`` with one ``@svc.respond`` handler on the
server backend, in the run's namespace; ``--side raw`` runs the hand-written
responder of ``bench.raw_rpc`` that does the same work (request stored,
consumed in a group, acked), ``--side light`` its lighter reference (Redis:
no group, no ack; NATS: core request-reply, nothing stored). It talks to its
parent as ``bench.worker`` does: ``{"event": "ready"}`` once it answers
requests, then ``stop`` (or the end of stdin) ends it with ``{"event":
"done", "answered": n}``.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import raw_rpc
from bench.flow import SUBJECT, Answer, Ask
from bench.payload import CONCURRENCY, PREFETCH
from bench.servers import SERVERS, Server
from bench.worker import emit, read_command
from wirework.service import Service


async def wirework(server: Server, namespace: str) -> int:
    answered = 0
    broker = server.broker(namespace)
    service = Service("bench-responder", broker=broker)

    @service.respond(SUBJECT, concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def answer(ask: Ask) -> Answer:
        nonlocal answered
        answered += 1
        return Answer(n=ask.n)

    async with broker, service:
        emit(event="ready")
        await read_command()
    return answered


async def raw(server: Server, namespace: str, *, light: bool = False) -> int:
    responders = raw_rpc.LIGHT_RESPONDERS if light else raw_rpc.RESPONDERS
    async with responders[server.name](server.url, namespace) as answered:
        emit(event="ready")
        await read_command()
        return answered()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.responder", description=__doc__)
    parser.add_argument("--side", choices=("wirework", "raw", "light"), required=True)
    parser.add_argument("--server", choices=sorted(SERVERS), required=True)
    parser.add_argument("--namespace", required=True)
    args = parser.parse_args()
    server = SERVERS[args.server]
    if args.side == "wirework":
        answered = asyncio.run(wirework(server, args.namespace))
    else:
        answered = asyncio.run(raw(server, args.namespace, light=args.side == "light"))
    emit(event="done", answered=answered)


if __name__ == "__main__":
    main()
