"""A consumer process for the multi-process workloads: ``python -m bench.worker``.

It talks to its parent in JSON lines. On stdout: ``{"event": "ready"}`` once
the broker is open; with ``--report-seen`` one ``{"event": "seen", "id": ...,
"at": <CLOCK_MONOTONIC seconds>}`` per handled message (the clock is
machine-wide on Linux, so the parent can subtract its own readings); and
``{"event": "done", ...}`` with its counts when stopped, and with ``--record``
its transactions (``ran``, as ``bench.floor.Replayed`` fields, for the floor to
run again). On stdin: ``go``
starts ``--consumers`` Consumers of the benchmark's group; ``stop``, or the end
of stdin (the parent is gone), stops them and ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import floor, probe
from bench.payload import CONCURRENCY, SUBSCRIPTION, Order
from bench.plan import run_sqlite_side
from bench.sqlite_e2e import open_broker
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def read_command() -> str:
    """The next line from the parent; ``""`` when stdin is closed."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def run(
    db: Path, *, durability: str, consumers: int, report_seen: bool, record: bool
) -> None:
    async def handle(order: Order, envelope: Envelope) -> None:
        if report_seen:
            emit(event="seen", id=envelope.id, at=time.monotonic())

    async with open_broker(db, durability) as broker:
        emit(event="ready")
        if await read_command() != "go":
            return
        running = [
            Consumer(
                broker, SUBSCRIPTION, routes=[Route(None, Order, handle)], concurrency=CONCURRENCY
            )
            for _ in range(consumers)
        ]
        transactions = probe.Transactions.of(broker)
        cpu = probe.process_cpu()
        recorded = broker.record_transactions() if record else []
        async with asyncio.TaskGroup() as tasks:
            for consumer in running:
                tasks.create_task(consumer.run())
            await read_command()
            for consumer in running:
                await consumer.stop()
        spent = probe.Transactions.of(broker) - transactions
        emit(
            event="done",
            handled=sum(consumer.stats.handled for consumer in running),
            commits=spent.commits,
            operations=spent.operations,
            synced=spent.synced,
            cpu_seconds=probe.process_cpu() - cpu,
            ran=[dataclasses.astuple(one) for one in floor.recorded(broker, recorded)],
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--durability", choices=("strict", "fast"), default="strict")
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--report-seen", action="store_true")
    parser.add_argument("--record", action="store_true", help="send its transactions when done")
    args = parser.parse_args()
    run_sqlite_side(
        run(
            args.db,
            durability=args.durability,
            consumers=args.consumers,
            report_seen=args.report_seen,
            record=args.record,
        )
    )


if __name__ == "__main__":
    main()
