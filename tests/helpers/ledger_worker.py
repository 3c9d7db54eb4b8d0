"""Worker processes of the ledger workload (RELIABILITY.md §2.0), run by the fault tests.

Started from the repository root as ``python -m tests.helpers.ledger_worker``:

``publish``
    publishes ids ``<name>-<n>`` with body ``{"id": ..., "amount": 1}``,
    recording ``invoke`` before and ``ok`` / ``fail`` / ``info`` after each
    attempt (with its duration ``dt``), at an optional fixed rate, until
    ``--count``, ``--duration`` or SIGTERM (which lets running publishes end).
``consume``
    runs a ``Consumer`` over a ``RecordingBroker``: ``received``, ``invoked``,
    ``handled``, ``acked`` ... lines; the handler can sleep, block for good
    after some invocations, or always fail for chosen ids. SIGTERM calls
    ``consumer.stop(grace=...)``; crash points come from ``FAULT_POINT``.
``lock``
    holds ``BEGIN EXCLUSIVE`` on the broker file for ``--hold`` seconds,
    recording ``locked`` and ``released``.

Each process writes ``<name>.<pid>.ledger`` in ``--ledger``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from tests.helpers.recording import RecordingBroker
from wirework.brokers.base import Subscription
from wirework.brokers.sqlite import SqliteBroker, SqliteSettings
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import (
    BrokerBusyError,
    BrokerUnavailableError,
    ConfigurationError,
    MessageTooLargeError,
    PublishOutcomeUnknownError,
    QueueFullError,
)
from wirework.testing.ledger import SUFFIX, LedgerFile

TOPIC = "ledger"
GROUP = "ledger-group"
ITEM_TYPE = "wirework.ledger.item"

#: Errors after which the contract says nothing was stored: a definite ``fail``
#: (``PublishOutcomeUnknownError``, a BrokerUnavailableError, is caught first as ``info``).
DEFINITE_ERRORS = (
    BrokerBusyError,
    BrokerUnavailableError,
    QueueFullError,
    MessageTooLargeError,
    ConfigurationError,
)


class LedgerItem(BaseModel):
    """The ledger workload's message body."""

    id: str
    amount: int = 1


def item(message_id: str) -> WireMessage:
    """The message published for one ledger id (the CloudEvent id is the ledger id)."""
    envelope = Envelope.new(
        ITEM_TYPE, LedgerItem(id=message_id), source="wirework.tests.faults", id=message_id
    )
    return encode_binary(envelope)


def ledger_file(directory: str, name: str) -> LedgerFile:
    return LedgerFile(Path(directory) / f"{name}.{os.getpid()}{SUFFIX}")


def open_broker(args: argparse.Namespace) -> SqliteBroker:
    settings = SqliteSettings(busy_timeout=args.busy_timeout, poll_interval=args.poll_interval)
    return SqliteBroker(args.db, settings=settings)


async def publish(args: argparse.Namespace) -> int:
    broker = open_broker(args)
    counter = itertools.count()
    start = time.monotonic()
    end = start + args.duration if args.duration > 0 else math.inf
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    with ledger_file(args.ledger, args.name) as ledger:

        async def producer() -> None:
            while not stopping.is_set():
                n = next(counter)
                if n >= args.count or time.monotonic() >= end:
                    return
                if args.rate > 0:
                    await asyncio.sleep(start + n / args.rate - time.monotonic())
                message_id = f"{args.name}-{n}"
                ledger.record("invoke", message_id)
                began = time.monotonic()
                try:
                    await broker.publish(TOPIC, item(message_id))
                except PublishOutcomeUnknownError as exc:  # sent, then the link broke
                    took = time.monotonic() - began
                    ledger.record("info", message_id, dt=f"{took:.6f}", error=type(exc).__name__)
                except DEFINITE_ERRORS as exc:
                    took = time.monotonic() - began
                    ledger.record("fail", message_id, dt=f"{took:.6f}", error=type(exc).__name__)
                except Exception as exc:  # an unknown outcome, as Jepsen's :info
                    took = time.monotonic() - began
                    ledger.record("info", message_id, dt=f"{took:.6f}", error=type(exc).__name__)
                else:
                    ledger.record("ok", message_id, dt=f"{time.monotonic() - began:.6f}")

        async with asyncio.TaskGroup() as producers:
            for _ in range(args.tasks):
                producers.create_task(producer())
    await broker.aclose()
    return 0


async def consume(args: argparse.Namespace) -> int:
    poison = set(filter(None, args.poison.split(",")))
    broker = open_broker(args)
    with ledger_file(args.ledger, args.name) as ledger:
        invocations = 0
        never = asyncio.Event()

        async def handle(body: LedgerItem, envelope: Envelope) -> None:
            nonlocal invocations
            invocations += 1
            ledger.record("invoked", envelope.id)
            if 0 <= args.block_after < invocations:
                await never.wait()  # hold the delivery until the process is killed
            if args.handler_sleep > 0:
                await asyncio.sleep(args.handler_sleep)
            if envelope.id in poison:
                raise RuntimeError(f"poison message {envelope.id}")
            ledger.record("handled", envelope.id)

        consumer = Consumer(
            RecordingBroker(broker, ledger),
            Subscription(
                topic=TOPIC, group=GROUP, lease_timeout=args.lease, prefetch=args.prefetch
            ),
            routes=[Route(ITEM_TYPE, LedgerItem, handle)],
            retry=RetryPolicy(max_attempts=args.max_attempts, base_delay=args.base_delay),
            concurrency=args.concurrency,
        )
        stopping: set[asyncio.Task[None]] = set()

        async def stop() -> None:
            ledger.record("stopping", "-")
            await consumer.stop(grace=args.grace)

        def on_sigterm() -> None:
            if not stopping:
                stopping.add(asyncio.ensure_future(stop()))

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        ledger.record("started", "-")
        await consumer.run()
        await asyncio.gather(*stopping)
        await broker.aclose()
        ledger.record("stopped", "-")
    return 0


def lock(args: argparse.Namespace) -> int:
    with ledger_file(args.ledger, args.name) as ledger:
        connection = sqlite3.connect(args.db, isolation_level=None, timeout=10)
        connection.execute("BEGIN EXCLUSIVE")
        ledger.record("locked", "-")
        time.sleep(args.hold)  # holding the lock is this process's whole job
        connection.execute("COMMIT")
        ledger.record("released", "-")
        connection.close()
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m tests.helpers.ledger_worker")
    commands = top.add_subparsers(dest="command", required=True)
    for name in ("publish", "consume", "lock"):
        sub = commands.add_parser(name)
        sub.add_argument("--db", required=True)
        sub.add_argument("--ledger", required=True)
        sub.add_argument("--name", required=True)
        sub.add_argument("--busy-timeout", type=float, default=5.0)
        sub.add_argument("--poll-interval", type=float, default=1.0)
        if name == "publish":
            sub.add_argument("--count", type=int, default=100)
            sub.add_argument("--rate", type=float, default=0.0, help="publishes/s, 0: unpaced")
            sub.add_argument("--tasks", type=int, default=1)
            sub.add_argument("--duration", type=float, default=0.0, help="seconds, 0: no limit")
        elif name == "consume":
            sub.add_argument("--lease", type=float, default=1.0)
            sub.add_argument("--prefetch", type=int, default=10)
            sub.add_argument("--concurrency", type=int, default=1)
            sub.add_argument("--handler-sleep", type=float, default=0.0)
            sub.add_argument("--block-after", type=int, default=-1)
            sub.add_argument("--poison", default="", help="comma-separated ids that always fail")
            sub.add_argument("--max-attempts", type=int, default=5)
            sub.add_argument("--base-delay", type=float, default=0.1)
            sub.add_argument("--grace", type=float, default=5.0)
        else:
            sub.add_argument("--hold", type=float, default=4.0)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "publish":
        return asyncio.run(publish(args))
    if args.command == "consume":
        return asyncio.run(consume(args))
    return lock(args)


if __name__ == "__main__":
    sys.exit(main())
