"""``python -m bench [--suite NAME] [--quick] [--only 1,4] [--repeat 3] [--servers ...]``.

Suites: ``sqlite`` (workloads 1-6: the SQLite broker beside raw-sqlite3 floors),
``service`` (7-8: what Service adds over a Consumer; request-reply on memory://
and SQLite), ``backends`` (9-10: Redis, RabbitMQ, NATS beside their raw clients
and FastStream; ``--servers`` picks some), ``rpc`` (11: REST versus gRPC for one
handler, beside FastAPI, plain Starlette and plain grpcio), ``saga`` (12: 3-step
sagas per second on the SQLite store, and the per-step overhead over direct calls),
``safety`` (13: the inbox and the outbox against their unsafe counterparts),
``tracing`` (14: a small flow and request-reply with tracing on and off; 15: the
whole reference shop with tracing on and off).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench import (
    backends,
    floor,
    idle,
    probe,
    request_reply,
    rpc,
    safety,
    saga,
    service_overhead,
    shop_tracing,
    throughput,
    tracing,
)
from bench.payload import CONCURRENCY, PREFETCH, PUBLISH_WINDOW, PUBLISHERS, make_messages
from bench.plan import FULL, LOOP_VARIABLE, QUICK, Sizes, sqlite_loop
from bench.report import Figure, summary, table
from bench.servers import SERVERS, server_versions
from wirework import loops

WORKLOADS: dict[str, tuple[str, Callable[[Sizes], list[Figure]]]] = {
    "1": ("publish, consume, ack: one producer", throughput.one_producer),
    "2": ("publish, consume, ack: 8 publishers", throughput.eight_publishers),
    "3": ("4 consumers in 2 processes, one producer", throughput.processes),
    "4": ("idle latency", idle.latency),
    "5": ("idle consumer CPU", idle.idle_cpu),
    "6": ("backlog drain", throughput.backlog),
    "7": ("Service vs raw Consumer: drain a backlog", service_overhead.overhead),
    "8": ("request-reply, responder in this process", request_reply.in_process),
    "9": (
        "server backends: publish, consume, ack beside the raw client and FastStream",
        backends.throughputs,
    ),
    "10": ("server backends: request-reply, responder in another process", request_reply.servers),
    "11": ("REST versus gRPC, one typed handler, beside their baselines", rpc.rest_vs_grpc),
    "12": ("sagas: 3-step sagas/s and the per-step overhead", saga.saga_throughput),
    "13": ("the price of safety: inbox and outbox", safety.price_of_safety),
    "14": ("tracing overhead: a small flow, tracing on and off", tracing.tracing_overhead),
    "15": ("tracing overhead: the whole shop, tracing on and off", shop_tracing.shop_tracing),
}

#: Suites by name: their title in the output and their workloads.
SUITES: dict[str, tuple[str, list[str]]] = {
    "sqlite": ("SQLite broker", ["1", "2", "3", "4", "5", "6"]),
    "service": ("Service", ["7", "8"]),
    "backends": ("server backends", ["9", "10"]),
    "rpc": ("REST and gRPC", ["11"]),
    "saga": ("sagas", ["12"]),
    "safety": ("inbox and outbox", ["13"]),
    "tracing": ("tracing", ["14", "15"]),
}


def preamble(sizes: Sizes, quick: bool, suites: list[str]) -> str:
    size = make_messages(1)[0].size
    runs = f"median of {sizes.repeat} runs" if sizes.repeat > 1 else "one run each"
    titles = ", ".join(SUITES[suite][0] for suite in suites)
    lines = [
        f"wirework bench: {titles}{' (--quick)' if quick else ''}",
        f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}",
        f"messages: CloudEvents in binary mode, {size:,} bytes on the wire (headers + body), "
        f"built before the clock starts",
    ]
    if "sqlite" in suites:
        lines += [
            f"consumer: wirework.consumer.Consumer, concurrency {CONCURRENCY}, prefetch "
            f"{PREFETCH}, a handler that only counts; the Consumer decodes every message",
            f"event loop: {sqlite_loop()}, as `wirework run` picks it (--loop to choose); "
            f"the floor has none",
            f"producers: 'window 100' = {PUBLISH_WINDOW} publishes in flight ({PUBLISH_WINDOW} "
            f"lanes sharing one iterator); 'serial' = each publish awaited; '8 publishers' = "
            f"{PUBLISHERS} tasks, each serial; all on the same broker object as the consumer "
            f"in workloads 1-2",
            f"throughput = messages / (first publish .. last ack), {runs}; {sizes.messages:,} "
            f"messages ({sizes.serial_messages:,} for serial); durability strict = a "
            f"returned publish is on disk (wirework: the WAL's fdatasync after the loop's "
            f"commit, on a thread; the floor: synchronous FULL for the transactions the "
            f"broker synced after), fast = NORMAL, WAL in both",
            "floor: the broker's own SQL (wirework.brokers.sqlite_ops: multi-row INSERTs, "
            "one UPDATE ... RETURNING a claim, one DELETE per 64 acks) with plain sqlite3 in "
            "one thread, same pragmas: the broker's transactions of the run again, in the "
            "order they committed (3: those of all three processes; 6: on a copy of the "
            "backlog file), so on a backlog as deep as the broker's",
        ]
    if "backends" in suites:
        found = asyncio.run(server_versions())
        versions = ", ".join(found.get(name, f"{SERVERS[name].label} ?") for name in sizes.servers)
        lines.append(
            f"servers: {versions}; each workload runs in a namespace of its own "
            f"(wwbench-<random>), purged afterwards"
        )
    return "\n".join(lines)


def machine() -> str:
    """What a commit and a decode cost on this machine right now."""
    with tempfile.TemporaryDirectory(prefix="wirework-bench-") as tmp:
        strict = floor.commit_seconds(Path(tmp) / "strict.db", durability="strict")
        fast = floor.commit_seconds(Path(tmp) / "fast.db", durability="fast")
    return (
        f"a 1-row commit takes {strict * 1000:.2f} ms strict, {fast * 1000:.3f} ms fast; "
        f"decoding one message takes {probe.python_speed():.1f} us; "
        f"CPUs {others_busy():.0f} % busy with other processes"
    )


def others_busy() -> float:
    """Percent of all CPUs busy over half a second while the bench itself is idle."""
    return psutil.cpu_percent(interval=0.5)


def _terminated(signum: int, frame: object) -> None:
    # As Ctrl-C does: unwind, so children are killed and temporary files removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default="all",
        help="which workloads to run (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes, about a minute")
    parser.add_argument(
        "--only", default=None, help="workloads to run, e.g. 1,4 (default: the suite's)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each throughput case in 1-3 and 9 (median shown)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="server backends for workloads 9-10 (default: redis,rabbitmq,nats)",
    )
    parser.add_argument(
        "--loop",
        choices=loops.CHOICES,
        default="auto",
        help="event loop of the SQLite suite's wirework side (default: auto, as "
        "`wirework run` picks it: uvloop where installed); the other suites run on "
        "asyncio's, as their peers do",
    )
    args = parser.parse_args(argv)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    allowed = [number for suite in suites for number in SUITES[suite][1]]
    chosen = allowed
    if args.only is not None:
        chosen = [number.strip() for number in args.only.split(",") if number.strip()]
    unknown = [number for number in chosen if number not in allowed]
    if unknown:
        parser.error(
            f"unknown workload {', '.join(unknown)} for --suite {args.suite}; "
            f"choose from {', '.join(allowed)}"
        )
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    servers = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    if not servers or any(name not in SERVERS for name in servers):
        parser.error(f"--servers takes some of {', '.join(SERVERS)}")
    os.environ[LOOP_VARIABLE] = args.loop  # the SQLite suite's worker processes read it
    signal.signal(signal.SIGTERM, _terminated)
    sizes = dataclasses.replace(QUICK if args.quick else FULL, repeat=args.repeat, servers=servers)
    suites = [suite for suite in suites if set(SUITES[suite][1]) & set(chosen)]
    print(preamble(sizes, args.quick, suites), flush=True)
    print(f"machine at the start: {machine()}", flush=True)
    started = time.perf_counter()
    figures: dict[str, list[Figure]] = {suite: [] for suite in suites}
    for suite in suites:
        for number in SUITES[suite][1]:
            if number not in chosen:
                continue
            title, run = WORKLOADS[number]
            print(f"\nworkload {number}: {title}", flush=True)
            figures[suite] += run(sizes)
    print(f"\nmachine at the end: {machine()}")
    print(f"\nresults ({time.perf_counter() - started:.0f} s)")
    for suite in suites:
        if figures[suite]:
            print(f"\n{SUITES[suite][0]}\n")
            print(table(figures[suite]))
    every = [figure for suite in suites for figure in figures[suite]]
    print(f"\n{summary(every)}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main``, with an interruption (Ctrl-C, SIGTERM) reported in one line once cleanup ran."""
    try:
        return main(argv)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}); children stopped, namespaces purged", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(run())
