"""Workloads 8 and 10: request-reply round trips through ``Service.request``.

8: memory:// and SQLite, responder and caller in this process, on one broker.
10: each server backend, the responder in a ``bench.responder`` child, beside
the hand-written round trip of the server's raw client doing the same work
(``bench.raw_rpc``; the target) and a lighter raw round trip (reference only).
On the servers the reply comes back through the caller's direct inbox
(``wirework.brokers.base.DirectReplies``), as the raw clients' do.

Each case sends ``requests`` requests one after another (p50, p99), then
``concurrent_requests`` with ``IN_FLIGHT`` outstanding (p50, p99, requests/s).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from bench import raw_rpc
from bench.flow import IN_FLIGHT, SUBJECT, Answer, Ask, Call, RoundTrips, in_flight, one_by_one
from bench.payload import CONCURRENCY, PREFETCH
from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from bench.servers import SERVERS, Server, new_namespace, purge
from bench.sqlite_procs import ROOT, Worker
from wirework.brokers import connect
from wirework.brokers.base import Broker
from wirework.service import Service

#: Seconds one request may take before the run counts as broken.
TIMEOUT = 30.0

#: The largest p50 round trip allowed, as a multiple of the raw client's.
MAX_RAW_RATIO = 1.5


@contextlib.asynccontextmanager
async def wirework_caller(broker: Broker) -> AsyncIterator[Call]:
    """``Service.request`` on a running caller service: the public API, nothing bypassed."""
    caller = Service("bench-caller", broker=broker)

    async def call(n: int) -> None:
        answer = await caller.request(SUBJECT, Ask(n=n), returns=Answer, timeout=TIMEOUT)
        raw_rpc.check(answer, n)

    async with caller:
        yield call


@contextlib.asynccontextmanager
async def responding(broker: Broker) -> AsyncIterator[None]:
    """The responder of workload 8: a ``Service`` in this process, on the same broker."""
    service = Service("bench-responder", broker=broker)

    @service.respond(SUBJECT, concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def answer(ask: Ask) -> Answer:
        return Answer(n=ask.n)

    async with service:
        yield


async def measure(call: Call, sizes: Sizes) -> tuple[RoundTrips, RoundTrips]:
    return await one_by_one(call, sizes.requests), await in_flight(call, sizes.concurrent_requests)


def describe(sizes: Sizes) -> list[str]:
    return [
        f"request-reply: {sizes.requests:,} requests one after another, then "
        f"{sizes.concurrent_requests:,} from {IN_FLIGHT} tasks ({IN_FLIGHT} in flight); "
        f"time from the request() call to the parsed answer; 5 warm-up requests first",
        f"wirework: Service.request against @svc.respond(concurrency {CONCURRENCY}, prefetch "
        f"{PREFETCH}); request and reply are CloudEvents; the request is a durable publish, "
        f"consumed and acked; the reply goes to the caller's direct inbox on Redis (its own "
        f"stream, blocking XREAD), RabbitMQ (direct reply-to) and NATS (a core inbox "
        f"subscription), and to its reply topic (a durable publish, consumed and acked) on "
        f"memory:// and SQLite",
    ]


def figures(
    letters: Iterator[str], where: str, wirework: tuple[RoundTrips, RoundTrips]
) -> list[Figure]:
    """The five figures of one case (p50, p99 one at a time; p50, p99, rate in flight)."""
    one, many = wirework
    found = [
        Figure(next(letters), f"{where}, one at a time, p50", 1000 * one.p50, "ms"),
        Figure(next(letters), f"{where}, one at a time, p99", 1000 * one.p99, "ms"),
        Figure(next(letters), f"{where}, {IN_FLIGHT} in flight, p50", 1000 * many.p50, "ms"),
        Figure(next(letters), f"{where}, {IN_FLIGHT} in flight, p99", 1000 * many.p99, "ms"),
        Figure(next(letters), f"{where}, {IN_FLIGHT} in flight, rate", many.rate, "req/s"),
    ]
    for figure in found:
        figure.higher_is_better = figure.unit != "ms"
    return found


def in_process(sizes: Sizes) -> list[Figure]:
    """Workload 8: memory:// and SQLite (strict, the default), both services in this process."""
    letters = iter("abcdefghij")
    found: list[Figure] = []
    with scratch() as tmp:
        for label, url in (
            ("memory://", "memory://"),
            ("sqlite (strict)", f"sqlite:///{Path(tmp) / 'rr.db'}"),
        ):

            async def run(url: str = url) -> tuple[RoundTrips, RoundTrips]:
                async with (
                    connect(url) as broker,
                    responding(broker),
                    wirework_caller(broker) as call,
                ):
                    return await measure(call, sizes)

            case = figures(letters, label, asyncio.run(run()))
            for figure in case:
                figure.key = f"8{figure.key}"
                progress(figure)
            found += case
    found[0].notes = [*describe(sizes), "responder and caller: two Services on one broker object"]
    return found


@contextlib.asynccontextmanager
async def responder(side: str, server: Server, namespace: str) -> AsyncIterator[Worker]:
    """A started ``bench.responder`` child that said ``ready``; killed and reaped on the way out."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.responder",
        "--side",
        side,
        "--server",
        server.name,
        "--namespace",
        namespace,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    child = Worker(process)
    try:
        await child.expect("ready")
        yield child
    finally:
        await child.close()


async def across(
    server: Server, namespace: str, requests: int, concurrent: int, side: str
) -> tuple[RoundTrips, RoundTrips]:
    """One side's round trips on ``server``, its responder in a child process."""
    async with responder(side, server, namespace) as child:
        if side == "wirework":
            async with server.broker(namespace) as broker, wirework_caller(broker) as call:
                result = await one_by_one(call, requests), await in_flight(call, concurrent)
        else:
            callers = raw_rpc.LIGHT_CALLERS if side == "light" else raw_rpc.CALLERS
            async with callers[server.name](server.url, namespace) as call:
                result = await one_by_one(call, requests), await in_flight(call, concurrent)
        done = await child.stop()
    expected = requests + concurrent + 5
    if int(done["answered"]) < expected:
        raise RuntimeError(f"the {side} responder answered {done['answered']} of {expected}")
    return result


#: Rounds each side's requests are split into, at least: the sides take turns going first.
MIN_ROUNDS = 2


def pooled(results: list[tuple[RoundTrips, RoundTrips]]) -> tuple[RoundTrips, RoundTrips]:
    """The rounds of one side as if they were one run: all samples, all seconds."""
    return (
        RoundTrips(
            [x for one, _ in results for x in one.samples], sum(r[0].seconds for r in results)
        ),
        RoundTrips(
            [x for _, many in results for x in many.samples], sum(r[1].seconds for r in results)
        ),
    )


def rounds_of(server: Server, sizes: Sizes, first: int) -> dict[str, tuple[RoundTrips, RoundTrips]]:
    """Every side's round trips on ``server``, interleaved: the requests of each side are
    split into rounds, and the side that goes first moves on by one every round, so no
    side always runs first (on a cold server, or right after another side's load)."""
    sides = ["wirework", "raw", *(["light"] if server.name in raw_rpc.LIGHT_CALLERS else [])]
    rounds = max(MIN_ROUNDS, sizes.repeat)
    found: dict[str, list[tuple[RoundTrips, RoundTrips]]] = {side: [] for side in sides}
    namespace = new_namespace()
    print(f"  {server.label}: namespace {namespace}, {rounds} rounds", flush=True)
    try:
        for number in range(rounds):
            shift = (first + number) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                trips = asyncio.run(
                    across(
                        server,
                        namespace,
                        max(1, sizes.requests // rounds),
                        max(IN_FLIGHT, sizes.concurrent_requests // rounds),
                        side,
                    )
                )
                found[side].append(trips)
    finally:
        asyncio.run(purge(server, namespace))
    return {side: pooled(results) for side, results in found.items()}


def _stats(trips: tuple[RoundTrips, RoundTrips]) -> list[float]:
    one, many = trips
    return [1000 * one.p50, 1000 * one.p99, 1000 * many.p50, 1000 * many.p99, many.rate]


def servers(sizes: Sizes) -> list[Figure]:
    """Workload 10: each server backend, responder in another process, beside the raw client
    doing the same work (the target) and, where there is one, a lighter raw reference."""
    found: list[Figure] = []
    for index, name in enumerate(SERVERS):
        server = SERVERS[name]
        if name not in sizes.servers:
            continue
        reason = server.unreachable()
        if reason is not None:
            print(f"  skipped {server.label}: {reason}", flush=True)
            continue
        sides = rounds_of(server, sizes, index)
        letters = iter("abcdefghijklmno"[index * 5 : index * 5 + 5])
        wirework = sides["wirework"]
        case = figures(letters, server.label, wirework)
        light = _stats(sides["light"]) if "light" in sides else [None] * 5
        for figure, reference, lighter in zip(case, _stats(sides["raw"]), light, strict=True):
            figure.key = f"10{figure.key}"
            figure.floor = reference
            figure.floor_name = "raw"
            figure.peer = lighter
            figure.peer_name = "lighter raw"
        case[0].max_ratio = MAX_RAW_RATIO
        case[0].notes = [RAW_SIDES[name], *([LIGHT_SIDES[name]] if name in LIGHT_SIDES else [])]
        for figure in case:
            progress(figure)
        found += case
    if found:
        found[0].notes = [
            *describe(sizes),
            f"responder in a child process; each side's requests split into at least "
            f"{MIN_ROUNDS} rounds, the first side rotating round by round; percentiles over "
            f"all rounds' samples",
            "raw = the server's client doing the same work (the target); lighter raw = a "
            "cheaper round trip than wirework promises, for reference only (peer column)",
            *found[0].notes,
        ]
    return found


RAW_SIDES = {
    "redis": "raw (same work): redis-py XADD to the request stream; the responder reads it in "
    "a consumer group (blocking XREADGROUP), XADDs the answer to the caller's reply stream "
    "(NOMKSTREAM, capped), then XACKs; the caller's blocking XREAD on its reply stream",
    "rabbitmq": "raw (same work): aio-pika, request persistent, mandatory + confirmed through a "
    "durable direct exchange into a durable quorum queue, consumed with basic.qos 32 and "
    "manual ack, answered through direct reply-to (not persisted)",
    "nats": "raw (same work): nats-py js.publish with Nats-Msg-Id, awaiting the PubAck (file "
    "stream, interest retention); the responder's durable pull consumer (long-poll pulls, "
    "batch = free prefetch), explicit msg.ack(); the answer a core publish to the caller's "
    "inbox subject",
}

LIGHT_SIDES = {
    "redis": "lighter raw (reference only): XREAD, no group: the responder's plain blocking "
    "XREAD of the request stream, no consumer group, no ack",
    "nats": "lighter raw (reference only): core NATS, nothing stored: nc.request / msg.respond, "
    "no JetStream",
}
