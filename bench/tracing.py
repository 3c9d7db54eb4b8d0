"""Workload 14: what tracing costs a small flow, with the span store exporting.

Four services on one broker: ``shop`` publishes orders, ``billing`` handles
each and publishes a shipment, ``shipping`` handles the shipment, and
``inventory`` answers stock requests (request-reply). Each round runs the
flow twice, tracing off and on (each service its own provider, as separate
processes would have, all writing one span store file), alternating which
goes first; the median of each side is compared.

This is a stress figure, reported for information: the handlers do almost
nothing, so it shows what tracing costs per message, not per unit of real
work. Issue 8's target (tracing costs at most 10 % of *shop* throughput) is
judged on workload 15, the whole reference shop (``bench/shop_tracing.py``).

Handler latency is the time billing's message spends in its consume
middleware stack (tracing's span included), p50.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from bench.flow import Answer, Ask, in_flight, median, patience
from bench.idle import percentile
from bench.payload import CONCURRENCY, PREFETCH
from bench.plan import Sizes, progress, scratch
from bench.report import Figure
from wirework.brokers import connect
from wirework.consumer import ConsumeApp, Incoming
from wirework.service import Context, Service
from wirework.tracing import Tracing, configure_tracing, instrument
from wirework.tracing.setup import LEAN_SPANS_ENV, lean_spans_wanted

#: Rounds per backend (each runs off and on); the median of each side is reported.
ROUNDS = 3

#: Requests outstanding at once in the request-reply part.
REQUESTS_IN_FLIGHT = 16

#: Seconds one request may take before the run counts as broken.
TIMEOUT = 30.0


class Placed(BaseModel):
    order_id: int


class Shipment(BaseModel):
    order_id: int


@dataclass(frozen=True)
class Run:
    """One run of the flow: orders/s through both hops, billing's p50, requests/s."""

    flow_rate: float
    handler_p50: float
    request_rate: float


def timing(samples: list[float]) -> Callable[[ConsumeApp], ConsumeApp]:
    """A consume middleware recording how long each message takes inside it."""

    def middleware(app: ConsumeApp) -> ConsumeApp:
        async def timed(incoming: Incoming) -> None:
            begun = time.perf_counter()
            try:
                await app(incoming)
            finally:
                samples.append(time.perf_counter() - begun)

        return timed

    return middleware


async def run_flow(url: str, orders: int, requests: int, store: Path | None) -> Run:
    """The flow on a fresh broker at ``url``; traced into ``store`` when given."""
    broker = connect(url)
    shop, billing, shipping, inventory = (
        Service(name, broker=broker) for name in ("shop", "billing", "shipping", "inventory")
    )
    shipped = asyncio.Event()
    count = 0
    samples: list[float] = []
    billing.use(timing(samples))  # outermost: the consume span is inside it

    @billing.subscribe("orders", concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def bill(event: Placed, ctx: Context) -> None:
        await ctx.publish("shipments", Shipment(order_id=event.order_id))

    @shipping.subscribe("shipments", concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def ship(event: Shipment) -> None:
        nonlocal count
        count += 1
        if count == orders:
            shipped.set()

    @inventory.respond("stock", concurrency=CONCURRENCY, prefetch=PREFETCH)
    async def stock(ask: Ask) -> Answer:
        return Answer(n=ask.n)

    services = (shop, billing, shipping, inventory)
    tracings: list[Tracing] = []
    if store is not None:
        for service in services:
            tracing = configure_tracing(
                service.name, exporters=["store"], store=store, set_global=False
            )
            tracings.append(tracing)
            instrument(service, provider=tracing.provider)

    async def call(n: int) -> None:
        answer = await shop.request("stock", Ask(n=n), returns=Answer, timeout=TIMEOUT)
        if answer.n != n:
            raise RuntimeError(f"request {n} was answered for {answer.n}")

    try:
        async with shop, billing, shipping, inventory:
            started = time.perf_counter()
            window = asyncio.Semaphore(100)

            async def place(n: int) -> None:
                async with window:
                    await shop.publish("orders", Placed(order_id=n))

            async with asyncio.TaskGroup() as tasks:
                for n in range(orders):
                    tasks.create_task(place(n))
            await asyncio.wait_for(shipped.wait(), patience(orders))
            flow_seconds = time.perf_counter() - started
            trips = await in_flight(call, requests, REQUESTS_IN_FLIGHT)
    finally:
        for tracing in tracings:
            await asyncio.to_thread(tracing.shutdown)  # flushes: not timed
        await broker.aclose()
    return Run(orders / flow_seconds, percentile(samples, 0.5), trips.rate)


def on_backend(
    label: str, url: Callable[[int], str], sizes: Sizes, tmp: Path
) -> tuple[list[Run], list[Run]]:
    """(untraced runs, traced runs), alternating which side of a round goes first."""
    orders = max(200, sizes.service_messages // 4)
    requests = max(100, sizes.requests)
    off: list[Run] = []
    on: list[Run] = []
    for round_ in range(max(ROUNDS, sizes.repeat)):
        store = tmp / f"spans-{label}-{round_}.db"
        sides = [(off, None), (on, store)]
        if round_ % 2:
            sides.reverse()
        for runs, where in sides:
            runs.append(asyncio.run(run_flow(url(len(off) + len(on)), orders, requests, where)))
    return off, on


def tracing_overhead(sizes: Sizes) -> list[Figure]:
    """Workload 14: the flow on memory:// and SQLite (fast), tracing off and on."""
    figures: list[Figure] = []
    with scratch() as tmp:
        root = Path(tmp)
        backends: list[tuple[str, str, Callable[[int], str]]] = [
            ("a", "memory://", lambda _: "memory://"),
            ("b", "sqlite (fast)", lambda n: f"sqlite:///{root}/broker-{n}.db?durability=fast"),
        ]
        for letter, label, url in backends:
            off, on = on_backend(letter, url, sizes, root)
            runs = ", ".join(
                f"{o.flow_rate:,.0f}/{f.flow_rate:,.0f}" for o, f in zip(on, off, strict=True)
            )
            rr_runs = ", ".join(
                f"{o.request_rate:,.0f}/{f.request_rate:,.0f}" for o, f in zip(on, off, strict=True)
            )
            rounds = len(on)
            figures += [
                Figure(
                    f"14{letter}1",
                    f"{label}, publish -> handle+publish -> handle, traced",
                    median([r.flow_rate for r in on]),
                    "msg/s",
                    floor=median([r.flow_rate for r in off]),
                    floor_name="untraced",
                    notes=[f"median of {rounds} rounds (traced/untraced msg/s: {runs})"],
                ),
                Figure(
                    f"14{letter}2",
                    f"{label}, billing handler p50, traced",
                    1000 * median([r.handler_p50 for r in on]),
                    "ms",
                    floor=1000 * median([r.handler_p50 for r in off]),
                    floor_name="untraced",
                    higher_is_better=False,
                ),
                Figure(
                    f"14{letter}3",
                    f"{label}, request-reply, {REQUESTS_IN_FLIGHT} in flight, traced",
                    median([r.request_rate for r in on]),
                    "req/s",
                    floor=median([r.request_rate for r in off]),
                    floor_name="untraced",
                    notes=[f"median of {rounds} rounds (traced/untraced req/s: {rr_runs})"],
                ),
            ]
            for figure in figures[-3:]:
                progress(figure)
    figures[0].notes = [*describe(sizes), *figures[0].notes]
    return figures


def span_kind() -> str:
    """Which spans the traced side makes: lean ones unless ``WIREWORK_LEAN_SPANS=0``."""
    if not lean_spans_wanted():
        return f"the OpenTelemetry SDK's ({LEAN_SPANS_ENV}=0)"
    return f"lean (straight into span store rows; the SDK's with {LEAN_SPANS_ENV}=0)"


def describe(sizes: Sizes) -> list[str]:
    orders = max(200, sizes.service_messages // 4)
    return [
        f"Tracing overhead: {orders:,} orders published 100 at a time by `shop`, handled by "
        f"`billing` (publishes a shipment) and `shipping`, then {max(100, sizes.requests):,} "
        f"requests to `inventory` ({REQUESTS_IN_FLIGHT} in flight); concurrency {CONCURRENCY}, "
        f"prefetch {PREFETCH}; traced: a provider per service, every span sampled, the span "
        f"store exporter (SQLite) on its batching thread, spans {span_kind()}; untraced: the "
        f"same services with no middleware; a stress figure (handlers doing almost nothing), "
        f"for information: issue 8's target is judged on the shop (workload 15)",
    ]
