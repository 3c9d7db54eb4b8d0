"""Orders: takes orders over REST and gRPC, reserves stock, charges payments, announces.

``POST /v1/orders`` queues a ``PlaceOrder`` command and answers 202 at once;
``place_order`` (a competing consumer of that queue) reserves stock by
request-reply, charges the customer through payments' gRPC endpoint behind the
policies of ``policies.yaml`` (timeout, retries with an idempotency key, a
circuit breaker, a bulkhead), and publishes the outcome. When payment fails
the reserved units go back to inventory (a hand-written compensation; the
fulfilment saga will own this flow).
"""

from __future__ import annotations

from pathlib import Path

from examples.shop.models import (
    ChargeRequest,
    OrderAccepted,
    OrderPlaced,
    OrderRejected,
    OrderView,
    PlaceOrder,
    PrintLabel,
    ReleaseStock,
    ReserveStock,
    StockReservation,
)
from examples.shop.payments import charge, payments
from wirework.errors import NotFoundError, WireworkError
from wirework.grpc import GrpcClient
from wirework.registry import Registry
from wirework.resilience import CircuitBreaker, Pipeline, build_pipelines, load_policies
from wirework.service import CallContext, Context, Service

orders = Service("orders")

POLICIES = Path(__file__).with_name("policies.yaml")

#: Orders' read model, as ``GET /v1/orders/{order_id}`` shows it (kept in memory here).
VIEWS: dict[str, OrderView] = {}


class Payments:
    """Orders' way to payments: the gRPC client, behind the policies for ``payments``."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.policy: Pipeline = build_pipelines(load_policies(POLICIES))["payments"]
        self.client = GrpcClient(
            payments, registry=registry or Registry.from_env(), policy=self.policy
        )

    @property
    def breaker(self) -> CircuitBreaker:
        found = self.policy.find(CircuitBreaker)
        if found is None:
            raise LookupError("policies.yaml gives payments no circuit_breaker")
        return found

    async def charge(self, order: PlaceOrder) -> str:
        receipt = await self.client.call(
            charge,
            request=ChargeRequest(
                order_id=order.order_id, customer=order.customer, amount_cents=order.total_cents
            ),
            idempotency_key=f"charge:{order.order_id}",  # what makes a retry safe
        )
        return receipt.charge_id


orders.provide(Payments, Payments)


@orders.post("/v1/orders", status_code=202)
async def submit_order(order: PlaceOrder) -> OrderAccepted:
    """Queue the order; the answer comes before it is placed (follow its correlation id)."""
    command = await orders.send("orders.place", order, key=order.order_id)
    VIEWS[order.order_id] = OrderView(order_id=order.order_id, status="accepted")
    return OrderAccepted(order_id=order.order_id, correlation_id=command.id)


@orders.get("/v1/orders/{order_id}")
async def get_order(order_id: str, ctx: CallContext) -> OrderView:
    """Where an order stands: accepted, placed or rejected, and why."""
    view = VIEWS.get(order_id)
    if view is None:
        raise NotFoundError(f"no order {order_id!r}; POST /v1/orders places one")
    return view


@orders.consume("orders.place", concurrency=4)
async def place_order(command: PlaceOrder, ctx: Context, pay: Payments) -> None:
    reservation = await ctx.request(
        "inventory.reserve",
        ReserveStock(order_id=command.order_id, sku=command.sku, quantity=command.quantity),
        returns=StockReservation,
        timeout=5,
    )
    if not reservation.reserved:
        await reject(ctx, command.order_id, f"out of stock: {command.sku}")
        return
    try:
        charge_id = await pay.charge(command)
    except WireworkError as exc:  # unavailable, circuit open, deadline, budget spent
        await ctx.request(
            "inventory.release",
            ReleaseStock(order_id=command.order_id, sku=command.sku, quantity=command.quantity),
            returns=StockReservation,
            timeout=5,
        )
        await reject(ctx, command.order_id, f"payment failed ({type(exc).__name__})")
        return
    VIEWS[command.order_id] = OrderView(
        order_id=command.order_id, status="placed", detail=f"charge {charge_id}"
    )
    placed = OrderPlaced(**command.model_dump())
    await ctx.publish("orders.events", placed, key=command.order_id)
    await ctx.send(
        "shipping.labels", PrintLabel(order_id=command.order_id, customer=command.customer)
    )


async def reject(ctx: Context, order_id: str, reason: str) -> None:
    VIEWS[order_id] = OrderView(order_id=order_id, status="rejected", detail=reason)
    await ctx.publish(
        "orders.events", OrderRejected(order_id=order_id, reason=reason), key=order_id
    )
