"""``make demo``: six orders through the shop, with the flow of each printed.

Orders are placed as commands on a queue; orders asks inventory by
request-reply; OrderPlaced fans out to notifications and analytics; labels go
to a pool of two shipping workers; one order is poison for analytics and ends
in the dead letters, without holding anything else up.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from examples.shop import analytics as analytics_module
from examples.shop import notifications as notifications_module
from examples.shop.analytics import analytics
from examples.shop.flow import FlowLog
from examples.shop.inventory import inventory
from examples.shop.models import PlaceOrder
from examples.shop.notifications import notifications
from examples.shop.orders import orders
from examples.shop.shipping import PRINTED, shipping_worker
from wirework.brokers import Broker, DeadLetterStore, Inspectable, connect
from wirework.envelope import Envelope
from wirework.service import Service

console = Console(highlight=False)

ORDERS = [
    PlaceOrder(order_id="o-1", customer="ada", sku="kettle", quantity=1, total_cents=3900),
    PlaceOrder(order_id="o-2", customer="bob", sku="teapot", quantity=1, total_cents=2500),
    PlaceOrder(order_id="o-3", customer="cy", sku="teapot", quantity=1, total_cents=2500),
    PlaceOrder(order_id="o-4", customer="dee", sku="mug", quantity=2, total_cents=-100),
    PlaceOrder(order_id="o-5", customer="eve", sku="kettle", quantity=2, total_cents=7800),
    PlaceOrder(order_id="o-6", customer="fay", sku="kettle", quantity=1, total_cents=3900),
]


SERVER_BACKENDS = {"redis": "redis", "rediss": "redis", "amqp": "rabbitmq", "nats": "nats"}
DEMO_NAMESPACE = "wirework-demo"


async def broker_url() -> str:
    """The demo's broker: a fresh SQLite file, or ``WIREWORK_BROKER``.

    On a server the demo works in a namespace of its own (``wirework-demo``
    unless the URL names one), emptied first, so each run starts clean and
    never touches anything else on the server.
    """
    url = os.environ.get("WIREWORK_BROKER")
    if url:
        scheme = url.split(":", 1)[0].lower()
        module_name = SERVER_BACKENDS.get(scheme)
        if module_name is None:
            return url
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        options.setdefault("namespace", DEMO_NAMESPACE)
        url = urlunsplit(parts._replace(query=urlencode(options)))
        module = importlib.import_module(f"wirework.brokers.{module_name}")
        await module.purge_namespace(url.split("?", 1)[0], options["namespace"])
        return url
    return fresh_sqlite_url()


def fresh_sqlite_url() -> str:
    """An empty SQLite broker file in ``.demo/``, kept afterwards for the CLI."""
    path = Path(".demo") / "shop.db"
    path.parent.mkdir(exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


async def wait_for(done: Callable[[], bool], what: str, limit: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not done():
        if loop.time() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )
    url = await broker_url()
    console.rule(f"[bold]wirework shop[/] on {url}")
    # memory:// lives in one process object, so every service shares it; any other
    # URL gives each service its own connection, as separate processes would have.
    shared: Broker | None = connect(url) if url.startswith("memory:") else None
    flow = FlowLog()
    workers = {name: shipping_worker(name) for name in ("worker-a", "worker-b")}
    services: dict[str, Service] = {
        "orders": orders,
        "inventory": inventory,
        "notifications": notifications,
        "analytics": analytics,
        **{f"shipping/{name}": worker for name, worker in workers.items()},
    }
    for label, service in services.items():
        service.use_broker(shared or url)
        service.use(flow.recorder(label))
    front = Service("storefront", broker=shared or url)
    try:
        for service in services.values():
            await service.start()
        async with front:
            console.print(f"placing {len(ORDERS)} orders on the [bold]orders.place[/] queue…")
            sent: dict[str, Envelope] = {}
            for order in ORDERS:
                sent[order.order_id] = await front.send("orders.place", order, key=order.order_id)
            await wait_for(lambda: len(notifications_module.SENT) == len(ORDERS), "notifications")
            await wait_for(lambda: sum(map(len, PRINTED.values())) == 4, "shipping labels")
            await wait_for(
                lambda: (
                    len(analytics_module.REVENUE_CENTS) == 3
                    and analytics.bindings[0].stats.dead_lettered == 1
                ),
                "analytics",
            )
        for service in services.values():
            await service.stop(grace=2)
        broker = shared or connect(url)
        try:
            await report(flow, sent, broker, url)
        finally:
            await broker.aclose()
    finally:
        for service in services.values():
            await service.stop(grace=0)


async def report(flow: FlowLog, sent: dict[str, Envelope], broker: Broker, url: str) -> None:
    console.print(
        "Each order's flow: who handled which message, and what caused it "
        "(ids shortened to 8 characters)."
    )
    for order in ORDERS:
        envelope = sent[order.order_id]
        correlation = envelope.correlationid or envelope.id
        console.print(
            f"\n[bold]{order.order_id}[/] {order.quantity} x {order.sku}  "
            f"[dim]correlation {correlation}[/]"
        )
        for depth, step in flow.tree(correlation):
            cause = f" <- {step.caused_by[:8]}" if step.caused_by else ""
            tries = f"  [red]{step.attempt} attempts[/]" if step.attempt > 1 else ""
            console.print(
                f"  {'  ' * depth}[cyan]{step.handler:<18}[/] {step.event_type:<22} "
                f"[dim]{step.event_id[:8]}{cause}[/]{tries}"
            )
    console.print()
    summary = Table("what", "count", title="summary")
    summary.add_row("notifications sent", str(len(notifications_module.SENT)))
    summary.add_row("revenue booked (cents)", str(sum(analytics_module.REVENUE_CENTS)))
    for name, labels in sorted(PRINTED.items()):
        summary.add_row(f"labels printed by {name}", str(len(labels)))
    if isinstance(broker, DeadLetterStore):
        dead = await broker.dead_letters()
        for letter in dead:
            error = letter.error.message if letter.error else ""
            summary.add_row(
                f"dead letter {letter.id} ({letter.topic}/{letter.group})",
                f"{letter.reason.value} after {letter.attempts} attempts: {error}",
            )
    console.print(summary)
    if isinstance(broker, Inspectable) and not url.startswith("memory:"):
        console.print("\nLook for yourself:")
        console.print(f"  .venv/bin/wirework topics --broker {url}")
        console.print(f"  .venv/bin/wirework dlq list --broker {url}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
