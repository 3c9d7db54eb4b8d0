"""Workload 13: the price of safety, on the SQLite store and on PostgreSQL.

* consume: a backlog drained by a ``Service`` whose handler writes one row;
  without the inbox the handler opens its own store transaction, with
  ``idempotent=True`` the same write goes through ``ctx.tx`` together with the
  claim on the message. The broker is ``memory://`` so the store's cost is
  what differs.
* publish: events sent one after another, straight to a durable broker
  (``svc.publish`` on a SQLite broker file, strict: a commit per publish) or
  through the outbox (one store transaction each with ``tx.publish``, relayed
  by the service's relay to the same kind of broker), each until every event
  has been consumed from the broker.
* relay latency: commit to publish, p50 and p99, from the relay's own stats.

PostgreSQL is used when it answers on 127.0.0.1:5432 (database ``test``, a
schema of its own, dropped afterwards); otherwise its figures are left out and
the run says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel

from bench.idle import percentile
from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from wirework.brokers import connect
from wirework.service import Context, Service
from wirework.store import Store, connect_store

POSTGRES = ("127.0.0.1", 5432)
CONCURRENCY = 8
TABLE = "bench_effects"


class Pay(BaseModel):
    n: int


def postgres_answers() -> bool:
    try:
        with socket.create_connection(POSTGRES, timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def store_for(kind: str, directory: Path) -> AsyncIterator[Store]:
    if kind == "sqlite":
        store = connect_store(f"sqlite:///{directory / f'store-{uuid.uuid4().hex[:6]}.db'}")
        async with store:
            yield store
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = connect_store(f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}")
    try:
        async with store:
            yield store
    finally:
        cleanup = connect_store("postgresql://postgres@127.0.0.1:5432/test")
        async with cleanup, cleanup.transaction() as tx:
            await tx.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def drain(store: Store, count: int, *, idempotent: bool) -> float:
    """Messages per second: a backlog of ``count`` drained, each writing one row."""
    async with store.transaction() as tx:
        await tx.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await tx.execute(f"CREATE TABLE {TABLE} (n INTEGER)")
    broker = connect("memory://")
    done = asyncio.Event()
    handled = 0
    svc = Service("bench-safety", broker=broker, store=store, relay=False)

    def count_one() -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    if idempotent:

        @svc.consume("bench.pay", concurrency=CONCURRENCY, idempotent=True)
        async def with_inbox(pay: Pay, ctx: Context) -> None:
            await ctx.tx.execute(f"INSERT INTO {TABLE} (n) VALUES ($1)", pay.n)
            count_one()

    else:

        @svc.consume("bench.pay", concurrency=CONCURRENCY)
        async def without(pay: Pay) -> None:
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {TABLE} (n) VALUES ($1)", pay.n)
            count_one()

    for n in range(count):
        await svc.send("bench.pay", Pay(n=n))
    started = time.perf_counter()
    async with svc:
        await asyncio.wait_for(done.wait(), 600)
        seconds = time.perf_counter() - started
    await broker.aclose()
    return count / seconds


async def publish(
    store: Store, count: int, directory: Path, *, outbox: bool
) -> tuple[float, list[float]]:
    """Events per second until all were consumed, and the relay's latencies."""
    broker = connect(f"sqlite:///{directory / f'broker-{uuid.uuid4().hex[:6]}.db'}")
    svc = Service("bench-safety", broker=broker, store=store)
    reader = Service("bench-reader", broker=broker)
    got = asyncio.Event()
    seen = 0

    @reader.subscribe("bench.paid", concurrency=CONCURRENCY)
    async def on_paid(pay: Pay) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            got.set()

    async with reader, svc:
        started = time.perf_counter()
        for n in range(count):
            if outbox:
                async with store.transaction() as tx:
                    await tx.publish("bench.paid", svc.envelope(Pay(n=n)))
            else:
                await svc.publish("bench.paid", Pay(n=n))
        await asyncio.wait_for(got.wait(), 600)
        seconds = time.perf_counter() - started
        latencies = list(svc._relay.stats.latencies) if svc._relay is not None else []
    await broker.aclose()
    return count / seconds, latencies


async def run_all(sizes: Sizes) -> list[Figure]:
    count = max(100, sizes.service_messages // 10)
    kinds = ["sqlite", *(["postgres"] if postgres_answers() else [])]
    if "postgres" not in kinds:
        print("  PostgreSQL does not answer on 127.0.0.1:5432: its figures are left out")
    figures: list[Figure] = []
    with scratch() as tmp:
        for letter, kind in zip("ace", kinds, strict=False):
            async with store_for(kind, Path(tmp)) as store:
                plain = statistics.median(
                    [await drain(store, count, idempotent=False) for _ in range(sizes.repeat)]
                )
                inbox = statistics.median(
                    [await drain(store, count, idempotent=True) for _ in range(sizes.repeat)]
                )
                direct, _ = await publish(store, count, Path(tmp), outbox=False)
                relayed, latencies = await publish(store, count, Path(tmp), outbox=True)
            label = "SQLite store" if kind == "sqlite" else "PostgreSQL store"
            figures += [
                Figure(
                    f"13{letter}",
                    f"consume with idempotent=True, {label}",
                    inbox,
                    "msg/s",
                    floor=plain,
                    floor_name="own tx",
                    notes=[
                        f"{count:,} messages on memory://, concurrency {CONCURRENCY}, one row "
                        f"each; reference: the same write in the handler's own transaction"
                    ],
                ),
                Figure(
                    f"13{chr(ord(letter) + 1)}",
                    f"publish through the outbox, {label}",
                    relayed,
                    "msg/s",
                    floor=direct,
                    floor_name="direct",
                    notes=[
                        f"one store transaction per event, relayed to a SQLite broker, against "
                        f"publishing to that broker directly; {count:,} events, timed until "
                        f"consumed; relay commit-to-publish p50 "
                        f"{statistics.median(latencies) * 1000:.1f} ms, p99 "
                        f"{percentile(latencies, 99) * 1000:.1f} ms"
                        if latencies
                        else "relay latencies: none recorded"
                    ],
                ),
            ]
    for figure in figures:
        progress(figure)
    return figures


def price_of_safety(sizes: Sizes) -> list[Figure]:
    return asyncio.run(run_all(sizes))
