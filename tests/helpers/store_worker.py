"""Worker processes of the store tests: an inbox consumer and an outbox relay.

Started from the repository root as ``python -m tests.helpers.store_worker``:

``consume``
    runs a ``Consumer`` with the inbox over ``--store`` and the broker at
    ``--broker`` (any URL but ``memory://``); the handler inserts one row
    into ``effects`` (``message_id``, ``process``; no unique constraint,
    created by the test) inside the inbox transaction, and records
    ``invoked`` in the ledger *outside* it, then sleeps ``--handler-sleep``
    seconds (still inside the transaction). The first invocation of an id in
    ``--slow`` holds its claim for ``--hold`` seconds (past the lease, so
    another process gets a copy); with ``--hold-until-copy`` it lets go as
    soon as any process's ledger shows a redelivered copy (attempt 2+) of
    that id received, and ``--hold`` is only the deadline. SIGTERM records ``stopping``, calls
    ``consumer.stop(grace=--grace)`` and records the inbox counts
    (``inbox - claimed=..``), then ``stopped``, and ``closed`` once broker
    and store are closed.
``relay``
    runs an outbox ``Relay`` from ``--store`` to the broker until
    SIGTERM; crash points (``outbox.after_publish_before_mark``) come from
    ``FAULT_POINT``.
``produce``
    writes ``--count`` orders, each an ``orders`` row (created by the test)
    and its event through the outbox in one transaction, with a ``Relay``
    running in the same process; records ``invoke`` before each transaction
    and ``ok`` / ``fail`` / ``info`` after it (ids ``<name>.<pid>-<n>``), then
    relays until SIGTERM. ``outbox.after_commit_before_relay`` is its crash
    point (DEV-14).

Every consumer and relay records ``started`` once running.

Each process writes ``<name>.<pid>.ledger`` in ``--ledger``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from pydantic import BaseModel

from tests.helpers.recording import RecordingBroker
from wirework.brokers import connect
from wirework.brokers.base import Subscription
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope
from wirework.store import (
    InboxStats,
    Relay,
    StoreBusyError,
    StoreConflictError,
    connect_store,
    current_transaction,
    inbox_middleware,
)
from wirework.testing.ledger import SUFFIX, History, LedgerFile, Record

TOPIC = "store-ledger"
GROUP = "store-group"
ITEM_TYPE = "wirework.ledger.item"

#: How often a ``--hold-until-copy`` handler reads the ledgers for its id's copy.
_COPY_POLL = 0.05


class LedgerItem(BaseModel):
    id: str
    amount: int = 1


def ledger_file(directory: str, name: str) -> LedgerFile:
    return LedgerFile(Path(directory) / f"{name}.{os.getpid()}{SUFFIX}")


def stop_on_sigterm() -> asyncio.Event:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    return stopping


async def consume(args: argparse.Namespace) -> int:
    slow = set(filter(None, args.slow.split(",")))
    store = connect_store(args.store)
    broker = connect(args.broker)
    stats = InboxStats()
    process = f"{args.name}.{os.getpid()}"
    held: set[str] = set()
    with ledger_file(args.ledger, args.name) as ledger:

        async def handle(body: LedgerItem, envelope: Envelope) -> None:
            ledger.record("invoked", envelope.id)
            await current_transaction().execute(
                "INSERT INTO effects (message_id, process) VALUES ($1, $2)", envelope.id, process
            )
            if args.handler_sleep > 0:
                await asyncio.sleep(args.handler_sleep)  # work, inside the transaction
            if envelope.id in slow and envelope.id not in held:
                held.add(envelope.id)
                ledger.record("holding", envelope.id)
                # The fault: hold the claim past the lease.
                if args.hold_until_copy:
                    await hold_until_copy(Path(args.ledger), envelope.id, args.hold)
                else:
                    await asyncio.sleep(args.hold)
            ledger.record("handled", envelope.id)

        consumer = Consumer(
            RecordingBroker(broker, ledger),
            Subscription(
                topic=TOPIC,
                group=GROUP,
                lease_timeout=args.lease,
                prefetch=args.prefetch or args.concurrency,
            ),
            routes=[Route(ITEM_TYPE, LedgerItem, handle)],
            retry=RetryPolicy(base_delay=0.05, max_attempts=10),
            concurrency=args.concurrency,
            middleware=[inbox_middleware(store, GROUP, stats=stats)],
        )
        stopping = stop_on_sigterm()
        running = asyncio.create_task(consumer.run())
        ledger.record("started", "-")
        await stopping.wait()
        ledger.record("stopping", "-")
        await consumer.stop(grace=args.grace)
        await running
        ledger.record(
            "inbox",
            "-",
            claimed=stats.claimed,
            duplicates=stats.duplicates,
            rolled_back=stats.rolled_back,
        )
        ledger.record("stopped", "-")
        await broker.aclose()
        await store.aclose()
        ledger.record("closed", "-")
    return 0


def redelivered(record: Record, message_id: str) -> bool:
    """Whether ``record`` is a ``received`` of a redelivered copy (attempt 2+) of the id."""
    return (
        record.kind == "received"
        and record.id == message_id
        and int(record.fields.get("attempt", "1")) >= 2
    )


async def hold_until_copy(ledger: Path, message_id: str, deadline: float) -> None:
    """Return once some process received a redelivered copy of ``message_id``, or after
    ``deadline`` seconds (the test then finds no overlapping copy and says so)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while loop.time() < until:
        if any(redelivered(r, message_id) for r in History.read(ledger).of("received")):
            return
        await asyncio.sleep(_COPY_POLL)


async def produce(args: argparse.Namespace) -> int:
    store = connect_store(args.store)
    broker = connect(args.broker)
    relaying = Relay(store, broker, max_poll=0.2, lease_timeout=2.0)
    with ledger_file(args.ledger, args.name) as ledger:
        stopping = stop_on_sigterm()
        running = asyncio.create_task(relaying.run())
        ledger.record("started", "-")
        for n in range(args.count):
            if stopping.is_set():
                break
            message_id = f"{args.name}.{os.getpid()}-{n}"
            ledger.record("invoke", message_id)
            try:
                async with store.transaction() as tx:
                    await tx.execute("INSERT INTO orders (id) VALUES ($1)", message_id)
                    await tx.publish(TOPIC, item(message_id))
            except (StoreBusyError, StoreConflictError) as exc:  # nothing was committed
                ledger.record("fail", message_id, error=type(exc).__name__)
            except Exception as exc:  # the commit may or may not have happened
                ledger.record("info", message_id, error=type(exc).__name__)
            else:
                ledger.record("ok", message_id)
        ledger.record("produced", "-")
        await stopping.wait()
        await relaying.stop()
        await running
    await broker.aclose()
    await store.aclose()
    return 0


def item(message_id: str) -> Envelope:
    """The event of one order; its CloudEvent id is the ledger id."""
    return Envelope.new(ITEM_TYPE, LedgerItem(id=message_id), source="/tests", id=message_id)


async def relay(args: argparse.Namespace) -> int:
    store = connect_store(args.store)
    broker = connect(args.broker)
    relaying = Relay(store, broker, batch_size=args.batch, max_poll=0.2, lease_timeout=2.0)
    with ledger_file(args.ledger, args.name) as ledger:
        stopping = stop_on_sigterm()
        running = asyncio.create_task(relaying.run())
        ledger.record("started", "-")
        await stopping.wait()
        await relaying.stop()
        await running
        ledger.record("relayed", "-", published=relaying.stats.published)
    await broker.aclose()
    await store.aclose()
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m tests.helpers.store_worker")
    commands = top.add_subparsers(dest="command", required=True)
    for name in ("consume", "relay", "produce"):
        sub = commands.add_parser(name)
        sub.add_argument("--store", required=True)
        sub.add_argument("--broker", required=True, help="a broker URL (not memory://)")
        sub.add_argument("--ledger", required=True)
        sub.add_argument("--name", required=True)
        if name == "consume":
            sub.add_argument("--lease", type=float, default=1.0)
            sub.add_argument("--concurrency", type=int, default=2)
            sub.add_argument("--prefetch", type=int, default=0, help="0: --concurrency")
            sub.add_argument("--handler-sleep", type=float, default=0.0)
            sub.add_argument("--grace", type=float, default=5.0)
            sub.add_argument("--slow", default="", help="comma-separated ids that hold a claim")
            sub.add_argument("--hold", type=float, default=0.0)
            sub.add_argument(
                "--hold-until-copy",
                action="store_true",
                help="end a hold once a redelivered copy was received (--hold: the deadline)",
            )
        elif name == "relay":
            sub.add_argument("--batch", type=int, default=100)
        else:
            sub.add_argument("--count", type=int, default=30)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "consume":
        return asyncio.run(consume(args))
    if args.command == "produce":
        return asyncio.run(produce(args))
    return asyncio.run(relay(args))


if __name__ == "__main__":
    sys.exit(main())
