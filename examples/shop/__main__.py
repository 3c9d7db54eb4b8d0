"""``make demo``: orders through the shop, each one's saga timeline and flow printed.

Orders arrive over REST (``POST /v1/orders``, with an ``Idempotency-Key``: a
retried request is answered from the store, not taken twice) and are written
with their ``OrderPlaced`` event in one transaction (the outbox). The event
fans out to notifications and starts the fulfilment saga in orders: inventory
holds the stock (request-reply), payments charges (gRPC, behind resilience
policies), shipping's pool of two workers gets the label (a queue); a declined
card compensates (the stock goes back). The outcome events fan out again to
notifications, analytics and inventory (an idempotent consumer); one order is
poison for analytics and ends in the dead letters, holding nothing else up.
Every hop is traced into ``.demo/spans.db`` (``wirework trace``, ``wirework
flow``). Then the demo cuts payments off: the circuit breaker opens, orders
are turned down fast (their stock given back), and once payments heals one
probe closes it.
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

import aiohttp
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from examples.shop import analytics as analytics_module
from examples.shop import notifications as notifications_module
from examples.shop.deployment import Shop, running_shop
from examples.shop.inventory import inventory, on_hand
from examples.shop.models import OrderAccepted, PlaceOrder
from examples.shop.orders import Payments, get_order, orders, submit_order
from examples.shop.payments import GATE
from examples.shop.shipping import PRINTED
from wirework.brokers import DeadLetterStore, connect
from wirework.cli.flow import flow_tree
from wirework.cli.saga import timeline
from wirework.errors import SagaNotFoundError
from wirework.grpc import GrpcClient
from wirework.http import HttpClient
from wirework.resilience.breaker import CircuitState, Transition
from wirework.saga import SagaRecord
from wirework.tracing.flow import load_flow
from wirework.tracing.span_store import SpanStore

console = Console(highlight=False)

ORDERS = [
    PlaceOrder(order_id="o-1", customer="ada", sku="kettle", quantity=1, total_cents=3900),
    PlaceOrder(order_id="o-2", customer="bob", sku="teapot", quantity=1, total_cents=2500),
    PlaceOrder(order_id="o-3", customer="cy", sku="teapot", quantity=1, total_cents=2500),
    PlaceOrder(order_id="o-4", customer="dee", sku="mug", quantity=2, total_cents=-100),
    PlaceOrder(order_id="o-5", customer="eve", sku="kettle", quantity=2, total_cents=7800),
    PlaceOrder(order_id="o-6", customer="fay", sku="kettle", quantity=2, total_cents=7800),
    PlaceOrder(order_id="o-7", customer="mallory", sku="mug", quantity=1, total_cents=900),
]
#: The order whose flow the demo draws, and the two whose saga timelines it prints.
FOLLOWED, COMPLETED, COMPENSATED = "o-1", "o-1", "o-7"


SERVER_BACKENDS = {"redis": "redis", "rediss": "redis", "amqp": "rabbitmq", "nats": "nats"}
DEMO_NAMESPACE = "wirework-demo"
#: Where the demo leaves its broker file, stores and spans for the CLI.
DEMO = Path(".demo")


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
    path = DEMO / "shop.db"
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


async def fulfilled(shop: Shop, order_id: str, limit: float = 30) -> SagaRecord:
    """The order's saga once it ended; it starts when ``OrderPlaced`` reaches orders."""
    async with asyncio.timeout(limit):
        while True:
            try:
                return await shop.orchestrator.result(order_id, timeout=limit)
            except SagaNotFoundError:
                await asyncio.sleep(0.02)


async def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )
    # The sagas' warnings tell what the timelines below show in full.
    logging.getLogger("wirework.saga").setLevel(logging.ERROR)
    url = await broker_url()
    console.rule(f"[bold]wirework shop[/] on {url}")
    async with running_shop(url, DEMO) as shop:
        console.print(
            f"orders answers REST on {shop.rest.url} (OpenAPI at /openapi.json) and gRPC on "
            f"127.0.0.1:{shop.grpc_orders.port}; payments answers gRPC on "
            f"127.0.0.1:{shop.grpc_payments.port} (`wirework proto` prints the .proto)"
        )
        async with shop.storefront() as storefront:
            accepted = await place(shop, storefront)
            console.print(
                "the label printers come on: two shipping workers share the labels queued "
                "for the placed orders"
            )
            await shop.start_printers()
            await wait_for(
                lambda: len(notifications_module.SENT) == 2 * len(ORDERS), "notifications"
            )
            await wait_for(lambda: sum(map(len, PRINTED.values())) == 4, "shipping labels")
            await wait_for(
                lambda: (
                    len(analytics_module.REVENUE_CENTS) == 3
                    and analytics_module.analytics.bindings[0].stats.dead_lettered == 1
                ),
                "analytics",
            )
            await report(shop, storefront, accepted)
            async with GrpcClient(orders, address=f"127.0.0.1:{shop.grpc_orders.port}") as grpc:
                view = await grpc.call(get_order, order_id="o-1")
            console.print(f"\norder o-1 over gRPC GetOrder: {view.status} ({view.detail})")
            await outage(shop, storefront, orders.resolve(Payments, "the demo"))
        await shop.flush_spans()
        draw_flow(shop, accepted[FOLLOWED].correlation_id)
    look_for_yourself(shop, url)


async def place(shop: Shop, storefront: HttpClient) -> dict[str, OrderAccepted]:
    """Place every order at once; their sagas compete for the stock.

    Kettles and teapots run short, so of o-2 and o-3 one gets the teapot and
    of o-5 and o-6 (two kettles each, beside o-1's one) one gets the kettles:
    which one varies from run to run, the totals do not.
    """
    console.print(f"placing {len(ORDERS)} orders at once with [bold]POST /v1/orders[/]…")

    async def checkout(order: PlaceOrder) -> OrderAccepted:
        key = f"checkout-{order.order_id}"
        return await storefront.call(submit_order, order=order, idempotency_key=key)

    answers = await asyncio.gather(*(checkout(order) for order in ORDERS))
    for order in ORDERS:
        await fulfilled(shop, order.order_id)
    await retry_lost_answer(shop, ORDERS[0], answers[0])
    return {order.order_id: answer for order, answer in zip(ORDERS, answers, strict=True)}


async def retry_lost_answer(shop: Shop, order: PlaceOrder, first: OrderAccepted) -> None:
    """Send o-1 again with its key, as a storefront that lost the answer would."""
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": f"checkout-{order.order_id}",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{shop.rest.url}/v1/orders", data=order.model_dump_json(), headers=headers
        ) as response,
    ):
        again = OrderAccepted.model_validate_json(await response.read())
        replayed = response.headers.get("Idempotent-Replayed")
    same = "the same" if again.correlation_id == first.correlation_id else "ANOTHER"
    console.print(
        f"sent {order.order_id} again with its Idempotency-Key: HTTP {response.status}, "
        f"Idempotent-Replayed: {replayed}, {same} correlation id; no second order"
    )


async def report(shop: Shop, storefront: HttpClient, accepted: dict[str, OrderAccepted]) -> None:
    table = Table("order", "item", "status", "detail", "correlation id", title="the orders")
    for order in ORDERS:
        view = await storefront.call(get_order, order_id=order.order_id)
        table.add_row(
            order.order_id,
            f"{order.quantity} x {order.sku}",
            view.status,
            view.detail,
            accepted[order.order_id].correlation_id[:12],
        )
    console.print(table)
    for saga_id, what in ((COMPLETED, "completes"), (COMPENSATED, "is compensated")):
        console.rule(f"[bold]fulfilment saga of {saga_id}[/]: it {what}")
        console.print(timeline(await shop.orchestrator.history(saga_id)))
    summary = Table("what", "count", title="summary")
    summary.add_row("notifications sent", str(len(notifications_module.SENT)))
    summary.add_row("revenue booked (cents)", str(sum(analytics_module.REVENUE_CENTS)))
    summary.add_row("rejections counted", str(len(analytics_module.REJECTED)))
    for name, labels in sorted(PRINTED.items()):
        summary.add_row(f"labels printed by {name}", str(len(labels)))
    for sku, (left, held, sold) in (await on_hand(inventory.store)).items():
        summary.add_row(f"{sku}: on hand / held / sold", f"{left} / {held} / {sold}")
    absorbed = inventory.inbox_stats.duplicates
    summary.add_row("inventory: copies absorbed by the inbox", str(absorbed))
    broker = connect(shop.url) if not shop.url.startswith("memory:") else orders.broker
    try:
        if isinstance(broker, DeadLetterStore):
            for letter in await broker.dead_letters():
                error = letter.error.message if letter.error else ""
                summary.add_row(
                    f"dead letter {letter.id} ({letter.topic}/{letter.group})",
                    f"{letter.reason.value} after {letter.attempts} attempts: {error}",
                )
    finally:
        if broker is not orders.broker:
            await broker.aclose()
    console.print(summary)


async def outage(shop: Shop, storefront: HttpClient, pay: Payments) -> None:
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
        for n in range(8, 14)
    ]
    console.print(f"payments is down; placing {len(down)} orders…")
    for order in down:
        key = f"checkout-{order.order_id}"
        await storefront.call(submit_order, order=order, idempotency_key=key)
    for order in down:
        await fulfilled(shop, order.order_id)
    table = Table("order", "status", "why", title="orders during the outage")
    for order in down:
        view = await storefront.call(get_order, order_id=order.order_id)
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
    probe = PlaceOrder(order_id="o-14", customer="hal", sku="mug", quantity=1, total_cents=900)
    await storefront.call(submit_order, order=probe, idempotency_key="checkout-o-14")
    await fulfilled(shop, probe.order_id)
    view = await storefront.call(get_order, order_id=probe.order_id)
    console.print(f"order o-14: {view.status} ({view.detail}); circuit {breaker.state}")


def draw_flow(shop: Shop, correlation: str) -> None:
    """The causation tree of one order, rebuilt from the span store as `wirework flow` does."""
    console.rule(f"[bold]the flow of {FOLLOWED}[/] (wirework flow {correlation[:12]})")
    flow = load_flow(SpanStore(shop.spans, create=False), correlation)
    if flow is None:
        raise SystemExit(f"demo: no spans of flow {correlation} in {shop.spans}")
    console.print(flow_tree(flow))


def look_for_yourself(shop: Shop, url: str) -> None:
    console.print("\nLook for yourself:")
    if not url.startswith("memory:"):
        console.print(f"  .venv/bin/wirework topics --broker {url}")
        console.print(f"  .venv/bin/wirework dlq list --broker {url}")
    console.print(f"  .venv/bin/wirework saga list --store {shop.orders_store}")
    console.print(f"  .venv/bin/wirework trace --last 5 --store {shop.spans}")
    console.print(f"  .venv/bin/wirework flow --last 5 --store {shop.spans}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
