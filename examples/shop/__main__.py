"""``make demo``: orders through the shop, with the flow of each printed.

Orders arrive over REST (``POST /v1/orders``) and are queued as commands;
orders asks inventory by request-reply and charges payments over gRPC behind
its resilience policies; OrderPlaced fans out to notifications and analytics;
labels go to a pool of two shipping workers; one order is poison for analytics
and ends in the dead letters, without holding anything else up. Then the
demo cuts payments off: the circuit breaker opens, orders are turned down
fast (their stock given back), and once payments heals one probe closes it.
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
from examples.shop.orders import VIEWS, Payments, get_order, orders, submit_order
from examples.shop.payments import GATE, payments
from examples.shop.shipping import PRINTED, shipping_worker
from wirework.brokers import Broker, DeadLetterStore, Inspectable, connect
from wirework.grpc import GrpcClient, GrpcServer
from wirework.http import HttpClient, HttpServer, http_app
from wirework.resilience.breaker import CircuitState, Transition
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
        "payments": payments,
        "inventory": inventory,
        "notifications": notifications,
        "analytics": analytics,
        **{f"shipping/{name}": worker for name, worker in workers.items()},
    }
    for label, service in services.items():
        service.use_broker(shared or url)
        service.use(flow.recorder(label))
    rest_server = HttpServer(http_app(orders))
    grpc_server = GrpcServer(orders, payments)
    try:
        for service in services.values():
            await service.start()
        await rest_server.start()
        await grpc_server.start()
        # Where orders finds payments (a file or this variable in a real deployment).
        os.environ["WIREWORK_REGISTRY"] = f"payments=grpc://127.0.0.1:{grpc_server.port}"
        console.print(
            f"orders answers REST on {rest_server.url} (OpenAPI at /openapi.json) and gRPC "
            f"on 127.0.0.1:{grpc_server.port} with payments (`wirework proto` prints the .proto)"
        )
        async with HttpClient(orders, address=rest_server.url) as storefront:
            console.print(f"placing {len(ORDERS)} orders with [bold]POST /v1/orders[/]…")
            sent: dict[str, str] = {}
            for order in ORDERS:
                accepted = await storefront.call(submit_order, order=order)
                sent[order.order_id] = accepted.correlation_id
            await wait_for(lambda: len(notifications_module.SENT) == len(ORDERS), "notifications")
            await wait_for(lambda: sum(map(len, PRINTED.values())) == 4, "shipping labels")
            await wait_for(
                lambda: (
                    len(analytics_module.REVENUE_CENTS) == 3
                    and analytics.bindings[0].stats.dead_lettered == 1
                ),
                "analytics",
            )
            broker = shared or connect(url)
            try:
                await report(flow, sent, broker, url)
            finally:
                if shared is None:
                    await broker.aclose()
            async with GrpcClient(orders, address=f"127.0.0.1:{grpc_server.port}") as grpc:
                view = await grpc.call(get_order, order_id="o-1")
            console.print(f"\norder o-1 over gRPC GetOrder: {view.status} ({view.detail})")
            await outage(storefront, orders.resolve(Payments, "the demo"))
    finally:
        await grpc_server.stop(1)
        await rest_server.stop()
        for service in services.values():
            await service.stop(grace=2)
        if shared is not None:
            await shared.aclose()


async def outage(storefront: HttpClient, pay: Payments) -> None:
    """Cut payments off: the breaker opens, orders fail fast; heal it: one probe closes it."""
    console.rule("[bold]payment outage[/]")
    breaker = pay.breaker
    started = breaker.clock.monotonic()

    def show(transition: Transition) -> None:
        console.print(
            f"  +{transition.at - started:5.2f} s  circuit to payments: "
            f"[bold]{transition.previous}[/] -> [bold]{transition.state}[/] ({transition.reason})"
        )

    breaker.add_listener(show)
    GATE.down = True
    attempts_before = GATE.attempts
    down = [
        PlaceOrder(order_id=f"o-{n}", customer="gus", sku="mug", quantity=1, total_cents=900)
        for n in range(7, 13)
    ]
    console.print(f"payments is down; placing {len(down)} orders…")
    for order in down:
        await storefront.call(submit_order, order=order)
    await wait_for(
        lambda: all(VIEWS[o.order_id].status == "rejected" for o in down), "rejected orders"
    )
    table = Table("order", "status", "why", title="orders during the outage")
    for order in down:
        view = VIEWS[order.order_id]
        table.add_row(view.order_id, view.status, view.detail)
    console.print(table)
    console.print(
        f"payments saw {GATE.attempts - attempts_before} charge attempts for {len(down)} orders "
        f"(retries with an idempotency key, then the open circuit turned calls down at once); "
        f"breaker: {breaker.stats.rejections} calls rejected while open"
    )
    GATE.down = False
    console.print("payments is back; the circuit lets one probe through after its cool-down…")
    await wait_for(lambda: breaker.state is CircuitState.HALF_OPEN, "the cool-down")
    probe = PlaceOrder(order_id="o-13", customer="hal", sku="mug", quantity=1, total_cents=900)
    await storefront.call(submit_order, order=probe)
    await wait_for(lambda: VIEWS["o-13"].status != "accepted", "the probe order")
    console.print(
        f"order o-13: {VIEWS['o-13'].status} ({VIEWS['o-13'].detail}); circuit {breaker.state}"
    )


async def report(flow: FlowLog, sent: dict[str, str], broker: Broker, url: str) -> None:
    console.print(
        "Each order's flow: who handled which message, and what caused it "
        "(ids shortened to 8 characters)."
    )
    for order in ORDERS:
        correlation = sent[order.order_id]
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
