"""Saga throughput: 3-step sagas per second on the SQLite store, and what a step costs.

Each step is what a real participant does at the least: one store
transaction writing its effect (a row) under its idempotency key. The same
three steps are also called directly, one after another, with no saga: the
ratio of the two per-step times is what orchestration adds (recording each
transition before acting on it, the lease, the history, the outbox event).

Cases: the orchestrator publishing its state changes through the outbox to a
``memory://`` broker and to a ``sqlite://`` broker (a Relay runs in the same
process), both with the store in its own SQLite file (WAL, synchronous=FULL:
every commit is fsynced, as in production).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pydantic import BaseModel

from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from wirework.brokers import connect
from wirework.saga import Orchestrator, Saga, StepContext
from wirework.store import Store, connect_store

STEPS = ("reserve", "charge", "ship")
#: Sagas in flight at once in the orchestrator.
IN_FLIGHT = 50


class Order(BaseModel):
    number: int


class Effect(BaseModel):
    key: str


def build(store: Store) -> Saga[Order]:
    saga = Saga("bench", Order)

    def declare(name: str) -> None:
        @saga.step(name)
        async def step(ctx: StepContext[Order]) -> Effect:
            await effect(store, ctx.idempotency_key)
            return Effect(key=ctx.idempotency_key)

    for name in STEPS:
        declare(name)
    return saga


async def effect(store: Store, key: str) -> None:
    """A participant's write: its effect, once per idempotency key."""
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO effects (key) VALUES ($1) ON CONFLICT (key) DO NOTHING", key)


async def prepared(path: Path) -> Store:
    store = connect_store(f"sqlite:///{path}")
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE effects (key TEXT PRIMARY KEY)")
    return store


async def ended(store: Store) -> int:
    async with store.transaction() as tx:
        return int(
            await tx.fetchval(
                "SELECT count(*) FROM wirework_saga WHERE status IN ('completed', "
                "'compensated', 'compensation_failed')"
            )
        )


async def through_sagas(directory: Path, broker_url: str, count: int) -> float:
    """Seconds from the first start to the last saga completed, orchestrator running."""
    store = await prepared(directory / "store.db")
    async with connect(broker_url) as broker:
        orchestrator = Orchestrator(
            store, [build(store)], broker=broker, poll_interval=0.05, max_sagas=IN_FLIGHT
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(orchestrator.run())
            started = time.perf_counter()
            for number in range(count):
                await orchestrator.start("bench", Order(number=number))
            while await ended(store) < count:
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - started
            await orchestrator.stop()
    await store.aclose()
    return seconds


async def directly(directory: Path, count: int) -> float:
    """Seconds to call the same three steps for ``count`` orders, no saga."""
    store = await prepared(directory / "direct.db")
    started = time.perf_counter()
    for number in range(count):
        for name in STEPS:
            await effect(store, f"{number}:{name}")
    seconds = time.perf_counter() - started
    await store.aclose()
    return seconds


def saga_throughput(sizes: Sizes) -> list[Figure]:
    """3-step sagas per second (memory:// and sqlite:// brokers) and the per-step overhead."""
    count = max(20, sizes.requests // 5)
    figures: list[Figure] = []
    with scratch() as tmp:
        root = Path(tmp)
        direct = asyncio.run(directly(root, count))
        per_step_direct = direct / (count * len(STEPS))
        for key, label, url in (
            ("12a", "memory://", "memory://"),
            ("12b", "sqlite://", f"sqlite:///{root / 'broker.db'}"),
        ):
            case = root / key
            case.mkdir()
            seconds = asyncio.run(through_sagas(case, url, count))
            figures.append(
                Figure(
                    key,
                    f"3-step sagas, SQLite store, {label} broker",
                    count / seconds,
                    "sagas/s",
                    notes=[f"{count} sagas, {IN_FLIGHT} in flight, from first start to last end"],
                )
            )
            progress(figures[-1])
            per_step = seconds / (count * len(STEPS))
            figures.append(
                Figure(
                    f"{key}'",
                    f"per step in a saga ({label}) vs the step called directly",
                    per_step * 1000,
                    "ms",
                    floor=per_step_direct * 1000,
                    floor_name="direct",
                    higher_is_better=False,
                    notes=[
                        "wall time per step over the whole run (sagas overlap); direct: the "
                        "same step, one store transaction writing its effect, called in a loop"
                    ],
                )
            )
            progress(figures[-1])
    figures[0].notes = [*describe(count), *figures[0].notes]
    return figures


def describe(count: int) -> list[str]:
    return [
        f"saga throughput: {count} sagas of 3 steps, each step one SQLite store transaction "
        f"(its effect under its idempotency key); every transition recorded (fsynced) before "
        f"it is acted on, state changes published through the outbox by a Relay in-process",
    ]
