"""Workload 15: what tracing costs the reference shop, the whole of it.

Issue 8 asks for "shop throughput and handler latency with tracing on and
off". Each side runs ``examples.shop`` (``running_shop``) in a fresh process,
so no provider, middleware or module state of one side leaks into the other:
orders go in over REST (``POST /v1/orders`` with an Idempotency-Key, the order
and its event written through the outbox), each runs the fulfilment saga
(inventory by request-reply, payments over gRPC, the label queued, the
confirmation through the outbox) and fans out to notifications, analytics
and inventory. An order counts once notifications has both of its messages.
The traced side gives every service its own provider exporting every span to
one span store, as ``make demo`` does; the untraced side has no tracing at all.
The label printers stay off (their labels wait in the queue): a printer
sleeps, which would only flatter the ratio.

Handler latency is the storefront's ``POST /v1/orders`` round trip, p50.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.plan import Sizes, progress
from bench.report import Figure

#: Traced throughput must reach this share of the untraced (issue 8: <= 10 % cost).
MIN_TRACED_RATIO = 0.9
#: Rounds (each runs both sides, alternating which goes first); the medians are compared.
#: Five, so that one round disturbed by another process on a 2-core machine cannot decide.
ROUNDS = 5
#: Orders in flight at once: payments' bulkhead takes 8 calls (policies.yaml).
IN_FLIGHT = 8
#: What notifications says when an order settles: confirmed (group 1) or rejected (2).
OUTCOME = re.compile(r"order (b-\d+) confirmed|about (b-\d+): sorry")
#: Orders placed before the clock starts (connections, caches, the first saga).
WARM_UP = 10
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"memory": "memory://", "sqlite": "sqlite:///{directory}/broker.db?durability=fast"}
#: The stores commit without waiting for the disk (``synchronous=NORMAL``): with
#: ``strict`` a run is bound by fsyncs, which would hide what tracing costs the CPU.
STORE_OPTIONS = "?durability=fast"


@dataclass(frozen=True)
class ShopRun:
    orders_per_second: float
    post_p50: float
    """Seconds."""
    cpu_per_order: float
    """CPU seconds the process spent per order (every thread: the span export's too)."""


def orders_for(sizes: Sizes) -> int:
    return max(60, sizes.requests // 2)


async def measure(url: str, directory: Path, *, traced: bool, orders: int) -> ShopRun:
    """Place ``orders`` (after a warm-up) and time them until every one is settled."""
    from examples.shop import notifications as notifications_module
    from examples.shop.deployment import running_shop
    from examples.shop.models import PlaceOrder
    from examples.shop.orders import submit_order

    latencies: list[float] = []
    gate = asyncio.Semaphore(IN_FLIGHT)
    outcomes: dict[str, asyncio.Future[bool]] = {}
    sent = notifications_module.SENT

    async def watch() -> None:
        """Settle each order's future from notifications' messages (True: confirmed)."""
        seen = 0
        while True:
            for text in sent[seen:]:
                found = OUTCOME.search(text)
                if found is not None:
                    order_id = found.group(1) or found.group(2)
                    outcomes[order_id].set_result(found.group(1) is not None)
            seen = len(sent)
            await asyncio.sleep(0.002)

    opened = running_shop(
        url, directory, traced=traced, stock={"kettle": 10**9}, store_options=STORE_OPTIONS
    )
    async with opened as shop, shop.storefront() as storefront:

        async def place(n: int) -> bool:
            """One order, end to end: at most IN_FLIGHT are between POST and outcome."""
            order = PlaceOrder(
                order_id=f"b-{n}", customer="ada", sku="kettle", quantity=1, total_cents=100
            )
            outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            outcomes[order.order_id] = outcome
            async with gate:
                started = time.perf_counter()
                await storefront.call(submit_order, order=order, idempotency_key=f"k-{n}")
                latencies.append(time.perf_counter() - started)
                async with asyncio.timeout(120):
                    return await outcome

        watching = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(place(n) for n in range(WARM_UP)))
            latencies.clear()
            started, cpu = time.perf_counter(), time.process_time()
            confirmed = await asyncio.gather(*(place(n) for n in range(WARM_UP, WARM_UP + orders)))
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
        finally:
            watching.cancel()
    if not all(confirmed):
        # A rejected order did less work than a confirmed one: the sides would differ.
        raise RuntimeError(f"{confirmed.count(False)} of {orders} orders were rejected")
    return ShopRun(orders / elapsed, statistics.median(latencies), cpu / orders)


def run_side(backend: str, *, traced: bool, orders: int) -> ShopRun:
    """One side in a process of its own; it prints its ``ShopRun`` as JSON."""
    with tempfile.TemporaryDirectory(prefix="wirework-shop-bench-") as directory:
        command = [sys.executable, "-m", "bench.shop_tracing", backend, str(orders), directory]
        if traced:
            command.append("--traced")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            command, cwd=directory, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the shop run failed:\n{done.stderr[-3000:]}")
        return ShopRun(**json.loads(done.stdout.strip().splitlines()[-1]))


def shop_tracing(sizes: Sizes) -> list[Figure]:
    """Workload 15: the shop, tracing off and on, on memory:// and SQLite (fast)."""
    orders = orders_for(sizes)
    figures: list[Figure] = []
    for letter, backend in zip("ab", BACKENDS, strict=True):
        off: list[ShopRun] = []
        on: list[ShopRun] = []
        for round_ in range(max(ROUNDS, sizes.repeat)):
            sides = [(off, False), (on, True)]
            if round_ % 2:
                sides.reverse()
            for runs, traced in sides:
                runs.append(run_side(backend, traced=traced, orders=orders))
        rates = ", ".join(
            f"{t.orders_per_second:,.1f}/{u.orders_per_second:,.1f}"
            for t, u in zip(on, off, strict=True)
        )
        figures += [
            Figure(
                f"15{letter}1",
                f"shop on {backend}: orders placed and settled, traced",
                statistics.median(r.orders_per_second for r in on),
                "orders/s",
                floor=statistics.median(r.orders_per_second for r in off),
                floor_name="untraced",
                min_ratio=MIN_TRACED_RATIO,
                notes=[f"median of {len(on)} rounds (traced/untraced orders/s: {rates})"],
            ),
            Figure(
                f"15{letter}3",
                f"shop on {backend}: CPU per order, traced",
                1000 * statistics.median(r.cpu_per_order for r in on),
                "ms",
                floor=1000 * statistics.median(r.cpu_per_order for r in off),
                floor_name="untraced",
                higher_is_better=False,
                notes=["what tracing costs whether or not the run waits on something else"],
            ),
            Figure(
                f"15{letter}2",
                f"shop on {backend}: POST /v1/orders p50, traced",
                1000 * statistics.median(r.post_p50 for r in on),
                "ms",
                floor=1000 * statistics.median(r.post_p50 for r in off),
                floor_name="untraced",
                higher_is_better=False,
            ),
        ]
        for figure in figures[-3:]:
            progress(figure)
    figures[0].notes = [
        f"The shop, whole: {orders} orders after {WARM_UP} to warm up, {IN_FLIGHT} at once, "
        f"over REST with an Idempotency-Key, each through the outbox, the 5-step fulfilment "
        f"saga (request-reply, gRPC, a queue) and three pub/sub fan-outs, until notifications "
        f"has both of its messages; each side in a fresh process; traced: a provider per "
        f"service, every span into one span store; target: traced >= {MIN_TRACED_RATIO:g} x "
        f"untraced (issue 8)",
        *figures[0].notes,
    ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="one side of workload 15 (internal)")
    parser.add_argument("backend", choices=sorted(BACKENDS))
    parser.add_argument("orders", type=int)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--traced", action="store_true")
    arguments = parser.parse_args()
    url = BACKENDS[arguments.backend].format(directory=arguments.directory)
    run = asyncio.run(
        measure(url, arguments.directory, traced=arguments.traced, orders=arguments.orders)
    )
    print(json.dumps(dataclasses.asdict(run)))


if __name__ == "__main__":
    main()
