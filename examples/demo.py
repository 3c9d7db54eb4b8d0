"""The walk-through ``make demo`` runs: every broker-contract behaviour, on one SQLite file.

A producer places orders; a ``shipping.labels`` queue is worked by two
competing workers (each its own connection to the file, as two processes would
be); ``orders.events`` fans out to two groups (``notifications`` and
``analytics``); one poison order fails every attempt and lands in the dead
letters, where ``wirework dlq`` finds it. The file is kept for inspection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from wirework.brokers import Broker, DeadLetterStore, Inspectable, Subscription, connect
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope, encode_binary

console = Console(highlight=False)
ORDERS = 12
POISON_ORDER = 7


class OrderPlaced(BaseModel):
    order_id: int
    customer: str
    total_cents: int


class LabelRequested(BaseModel):
    order_id: int
    address: str


def broker_url() -> tuple[str, Path | None]:
    url = os.environ.get("WIREWORK_BROKER")
    if url:
        return url, None
    path = Path(".demo") / "shop.db"
    path.parent.mkdir(exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}", path


async def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )
    url, path = broker_url()
    console.rule(f"[bold]wirework demo[/] on {url}")
    fast_retry = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)
    labels: Counter[str] = Counter()
    seen: dict[str, list[int]] = {"notifications": [], "analytics": []}
    poison_attempts = 0

    def worker(name: str, broker: Broker) -> Consumer:
        async def print_label(label: LabelRequested, event: Envelope) -> None:
            await asyncio.sleep(0.05)  # a label printer is slow: the other worker takes the next
            labels[name] += 1
            console.print(f"  [cyan]{name}[/] printed the label for order {label.order_id}")

        return Consumer(
            broker,
            Subscription(topic="shipping.labels", group="shipping", prefetch=2),
            routes=[Route("shipping.label_requested", LabelRequested, print_label)],
            concurrency=2,
        )

    def group(name: str, broker: Broker) -> Consumer:
        async def on_order(order: OrderPlaced, event: Envelope) -> None:
            nonlocal poison_attempts
            if name == "analytics" and order.order_id == POISON_ORDER:
                poison_attempts += 1
                raise ValueError(f"order {order.order_id} has a total analytics cannot book")
            seen[name].append(order.order_id)

        return Consumer(
            broker,
            Subscription(topic="orders.events", group=name),
            routes=[Route("shop.order_placed", OrderPlaced, on_order)],
            retry=fast_retry,
        )

    connections = [connect(url) for _ in range(3)]
    producer, worker_a_conn, worker_b_conn = connections
    consumers = [
        worker("worker-a", worker_a_conn),
        worker("worker-b", worker_b_conn),
        group("notifications", producer),
        group("analytics", producer),
    ]
    try:
        async with asyncio.TaskGroup() as tasks:
            for consumer in consumers:
                tasks.create_task(consumer.run())
            console.print(
                f"[bold]1.[/] placing {ORDERS} orders; each publishes OrderPlaced "
                "and queues a shipping label"
            )
            for order_id in range(1, ORDERS + 1):
                order = OrderPlaced(order_id=order_id, customer=f"c{order_id}", total_cents=999)
                event = Envelope.new(
                    "shop.order_placed", order, source="/orders", key=f"order-{order_id}"
                )
                await producer.publish("orders.events", encode_binary(event), key=event.key)
                label = LabelRequested(order_id=order_id, address="1 Main St")
                command = Envelope.new(
                    "shipping.label_requested",
                    label,
                    source="/orders",
                    causationid=event.id,
                    correlationid=event.correlationid,
                )
                await producer.publish("shipping.labels", encode_binary(command))
            await wait_for(lambda: sum(labels.values()) == ORDERS, 20, "the shipping labels")
            await wait_for(
                lambda: (
                    len(seen["notifications"]) == ORDERS
                    and len(seen["analytics"]) == ORDERS - 1
                    and consumers[3].stats.dead_lettered == 1
                ),
                20,
                "the order events",
            )
            for consumer in consumers:
                await consumer.stop(grace=2)
        await report(producer, labels, seen, poison_attempts, url, path)
    finally:
        for connection in connections:
            await connection.aclose()


async def report(
    broker: Broker,
    labels: Counter[str],
    seen: dict[str, list[int]],
    poison_attempts: int,
    url: str,
    path: Path | None,
) -> None:
    console.print(
        f"\n[bold]2.[/] queue [bold]shipping.labels[/]: two competing workers shared "
        f"{sum(labels.values())} labels, each exactly once: "
        + ", ".join(f"{name} {count}" for name, count in sorted(labels.items()))
    )
    console.print(
        f"[bold]3.[/] topic [bold]orders.events[/]: every group got its own copy: "
        f"notifications {len(seen['notifications'])}, analytics {len(seen['analytics'])} "
        f"(order {POISON_ORDER} is poison for analytics)"
    )
    if not (isinstance(broker, DeadLetterStore) and isinstance(broker, Inspectable)):
        raise SystemExit(f"demo: {type(broker).__name__} cannot list dead letters")
    dead = await broker.dead_letters()
    console.print(
        f"[bold]4.[/] the poison order was tried {poison_attempts} times with backoff, "
        f"then dead-lettered; the other groups never waited for it:"
    )
    table = Table("id", "topic/group", "reason", "attempts", "last error")
    for letter in dead:
        error = letter.error.message if letter.error else ""
        table.add_row(
            letter.id,
            f"{letter.topic}/{letter.group}",
            letter.reason.value,
            str(letter.attempts),
            error,
        )
    console.print(table)
    stats = Table("topic", "group", "ready", "in flight", "dead-lettered")
    for row in await broker.stats():
        stats.add_row(
            row.topic, row.group or "-", str(row.ready), str(row.in_flight), str(row.dead_lettered)
        )
    console.print("[bold]5.[/] what the broker holds now (acked messages are gone):")
    console.print(stats)
    flag = f" --broker {url}"
    console.print("\nLook for yourself:")
    console.print(f"  .venv/bin/wirework topics{flag}")
    console.print(f"  .venv/bin/wirework dlq list{flag}")
    if dead:
        console.print(f"  .venv/bin/wirework dlq show {dead[0].id}{flag}")
        console.print(f"  .venv/bin/wirework dlq replay {dead[0].id} --dry-run{flag}")
    if path is not None:
        console.print(f"(the broker file is {path}; the next `make demo` starts it afresh)")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
