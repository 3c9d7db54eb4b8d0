"""``python -m bench [--quick] [--only 1,4] [--repeat 3]``: SQLite broker figures beside floors."""

from __future__ import annotations

import argparse
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

from bench import floor, idle, probe, throughput
from bench.payload import CONCURRENCY, PREFETCH, PUBLISH_WINDOW, PUBLISHERS, make_messages
from bench.plan import FULL, QUICK, Sizes
from bench.report import Figure, summary, table

WORKLOADS: dict[str, tuple[str, Callable[[Sizes], list[Figure]]]] = {
    "1": ("publish, consume, ack: one producer", throughput.one_producer),
    "2": ("publish, consume, ack: 8 publishers", throughput.eight_publishers),
    "3": ("4 consumers in 2 processes, one producer", throughput.processes),
    "4": ("idle latency", idle.latency),
    "5": ("idle consumer CPU", idle.idle_cpu),
    "6": ("backlog drain", throughput.backlog),
}


def preamble(sizes: Sizes, quick: bool) -> str:
    size = make_messages(1)[0].size
    runs = f"median of {sizes.repeat} runs" if sizes.repeat > 1 else "one run each"
    return "\n".join(
        [
            f"wirework bench: SQLite broker{' (--quick)' if quick else ''}",
            f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
            f"{os.cpu_count()} CPUs, {platform.platform()}",
            f"messages: CloudEvents in binary mode, {size:,} bytes on the wire (headers + body), "
            f"built before the clock starts",
            f"consumer: wirework.consumer.Consumer, concurrency {CONCURRENCY}, prefetch "
            f"{PREFETCH}, a handler that only counts; the Consumer decodes every message",
            f"producers: 'window 100' = one task with {PUBLISH_WINDOW} publishes in flight "
            f"(asyncio.Semaphore); 'serial' = each publish awaited; '8 publishers' = "
            f"{PUBLISHERS} tasks, each serial; all on the same broker object as the consumer "
            f"in workloads 1-2",
            f"throughput = messages / (first publish .. last ack), {runs}; {sizes.messages:,} "
            f"messages ({sizes.serial_messages:,} for serial); durability strict = "
            f"synchronous FULL, fast = NORMAL, WAL in both",
            "floor: the same SQL per message with plain sqlite3 in one thread (publish: group "
            "lookup + message INSERT + delivery INSERT; claim: claim SELECT + per row lease "
            "UPDATE + body SELECT; ack: delivery DELETE + refs UPDATE + message DELETE), same "
            "pragmas, claims of the broker's average size, as many commits as the broker made",
        ]
    )


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="workloads to run, e.g. 1,4 (default: all)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each throughput case in 1-3 (median shown)"
    )
    args = parser.parse_args(argv)
    chosen = [number.strip() for number in args.only.split(",") if number.strip()]
    unknown = [number for number in chosen if number not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, _terminated)
    sizes = dataclasses.replace(QUICK if args.quick else FULL, repeat=args.repeat)
    print(preamble(sizes, args.quick), flush=True)
    print(f"machine at the start: {machine()}", flush=True)
    started = time.perf_counter()
    figures: list[Figure] = []
    for number in chosen:
        title, run = WORKLOADS[number]
        print(f"\nworkload {number}: {title}", flush=True)
        figures += run(sizes)
    print(f"\nmachine at the end: {machine()}")
    print(f"\nresults ({time.perf_counter() - started:.0f} s)\n")
    print(table(figures))
    print(f"\n{summary(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
