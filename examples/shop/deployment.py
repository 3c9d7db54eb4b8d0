"""The shop's services wired as one process would host them: brokers, stores, tracing, servers.

In production each service runs in its own process (``wirework run``); the
demo hosts them all in one, but gives each its own broker connection, its
own store (orders, inventory) and its own tracer provider, as separate
processes would have. Everything written lands in one directory (``.demo/``)
for the CLI to read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.trace import TracerProvider

from examples.shop.analytics import analytics
from examples.shop.fulfilment import fulfilment
from examples.shop.inventory import inventory, stock_up
from examples.shop.notifications import notifications
from examples.shop.orders import Payments, create_tables, orders
from examples.shop.payments import payments
from examples.shop.shipping import shipping_worker
from wirework.brokers import Broker, connect
from wirework.grpc import GrpcServer
from wirework.http import HttpClient, HttpServer, http_app
from wirework.saga import Orchestrator, SagaLineage
from wirework.service import Service
from wirework.tracing import Tracing, configure_tracing, instrument

#: Labels of the services ``running_shop`` leaves off until ``Shop.start_printers``.
PRINTERS = "shipping/"

#: Units on hand when the shop opens.
STOCK = {"kettle": 3, "teapot": 1, "mug": 10}


@dataclass
class Shop:
    """The running shop: what the demo talks to and reads from."""

    url: str
    directory: Path
    services: dict[str, Service]
    orchestrator: Orchestrator
    rest: HttpServer
    grpc_orders: GrpcServer
    grpc_payments: GrpcServer
    tracings: dict[str, Tracing] = field(default_factory=dict)

    @property
    def spans(self) -> Path:
        return self.directory / "spans.db"

    @property
    def orders_store(self) -> str:
        return f"sqlite:///{self.directory / 'orders.db'}"

    def provider(self, label: str) -> TracerProvider | None:
        """The tracer provider of ``label``'s service (None when the shop is not traced)."""
        return _provider(self.tracings, label)

    def storefront(self) -> HttpClient:
        """A client of orders' REST API, traced as the ``storefront`` service."""
        return HttpClient(
            orders, address=self.rest.url, tracer_provider=self.provider("storefront")
        )

    async def start_printers(self) -> None:
        """Switch the shipping workers on together: they share the labels queued so far."""
        printers = [s for label, s in self.services.items() if label.startswith(PRINTERS)]
        await asyncio.gather(*(printer.start() for printer in printers))

    async def flush_spans(self) -> None:
        """Export every span ended so far to the span store."""
        for tracing in self.tracings.values():
            await asyncio.to_thread(tracing.force_flush, 10.0)


def _provider(tracings: Mapping[str, Tracing], label: str) -> TracerProvider | None:
    tracing = tracings.get(label)
    return None if tracing is None else tracing.provider


def _empty(directory: Path) -> None:
    """``directory`` without the stores and spans of an earlier run."""
    directory.mkdir(exist_ok=True)
    for name in ("orders.db", "inventory.db", "spans.db"):
        for suffix in ("", "-wal", "-shm"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def running_shop(
    url: str,
    directory: Path,
    *,
    traced: bool = True,
    stock: Mapping[str, int] = STOCK,
    store_options: str = "",
) -> AsyncIterator[Shop]:
    """Start every service of the shop on ``url``, with fresh stores in ``directory``.

    ``traced=False`` leaves tracing out (``bench`` compares the two); ``stock`` is
    the units on hand at opening; ``store_options`` ends the stores' URLs
    (``?durability=fast``).
    """
    _empty(directory)
    # memory:// lives in one process object, so every service shares it; any other
    # URL gives each service its own connection, as separate processes would have.
    shared: Broker | None = connect(url) if url.startswith("memory:") else None
    workers = {name: shipping_worker(name) for name in ("worker-a", "worker-b")}
    services: dict[str, Service] = {
        "orders": orders,
        "payments": payments,
        "inventory": inventory,
        "notifications": notifications,
        "analytics": analytics,
        **{f"shipping/{name}": worker for name, worker in workers.items()},
    }
    tracings: dict[str, Tracing] = {}
    orders.use_publish(SagaLineage)  # a step's messages name their saga (sagaid)
    for label, service in services.items():
        service.use_broker(shared or url)
        if traced:
            tracing = configure_tracing(
                service.name, exporters=["store"], store=directory / "spans.db", set_global=False
            )
            instrument(service, provider=tracing.provider)
            tracings[label] = tracing
    if traced:
        tracings["storefront"] = configure_tracing(
            "storefront", exporters=["store"], store=directory / "spans.db", set_global=False
        )
    orders.use_store(f"sqlite:///{directory / 'orders.db'}{store_options}")
    inventory.use_store(f"sqlite:///{directory / 'inventory.db'}{store_options}")
    await orders.store.open()
    await create_tables(orders.store)
    await inventory.store.open()
    await stock_up(inventory.store, stock)
    orchestrator = Orchestrator(
        orders.store,
        [fulfilment],
        broker=orders.broker,  # saga state changes go out on wirework.sagas, by orders' relay
        relay=False,
        poll_interval=0.2,
        provider=tracings["orders"].provider if traced else None,  # a span per step
    )
    orders.provide(Orchestrator, lambda: orchestrator)
    shop = Shop(
        url=url,
        directory=directory,
        services=services,
        orchestrator=orchestrator,
        rest=HttpServer(http_app(orders, tracer_provider=_provider(tracings, "orders"))),
        grpc_orders=GrpcServer(orders, tracer_provider=_provider(tracings, "orders")),
        grpc_payments=GrpcServer(payments, tracer_provider=_provider(tracings, "payments")),
        tracings=tracings,
    )
    provider = shop.provider("orders")
    driving: asyncio.Task[None] | None = None
    clients: list[Payments] = []
    try:
        await shop.grpc_payments.start()
        # Where orders finds payments (a file or this variable in a real deployment).
        os.environ["WIREWORK_REGISTRY"] = f"payments=grpc://127.0.0.1:{shop.grpc_payments.port}"
        clients.append(Payments(tracer_provider=provider))
        orders.provide(Payments, lambda: clients[0])
        for label, service in services.items():
            if label.startswith(PRINTERS):
                await service.declare()  # labels wait in the queue for the printers
            else:
                await service.start()
        await shop.rest.start()
        await shop.grpc_orders.start()
        driving = asyncio.create_task(orchestrator.run(), name="fulfilment orchestrator")
        yield shop
    finally:
        if driving is not None:
            await orchestrator.stop()
            await driving
        await shop.grpc_payments.stop(1)
        await shop.grpc_orders.stop(1)
        await shop.rest.stop()
        for service in services.values():
            await service.stop(grace=2)
        for client in clients:
            await client.client.aclose()
        if shared is not None:
            await shared.aclose()
        for tracing in tracings.values():
            await asyncio.to_thread(tracing.shutdown)
