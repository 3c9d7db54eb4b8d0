"""Orders: takes orders over REST and gRPC, keeps them in its store, announces them.

``POST /v1/orders`` needs an ``Idempotency-Key``: a storefront that lost the
answer sends the same request again and gets the first answer back, so an
order is never taken twice. Taking an order is one store transaction: the
order row and its ``OrderPlaced`` event (through the outbox), so there is
never an order without its event, or an event without its order. The
fulfilment saga (``examples.shop.fulfilment``) starts from that event.

Payments is reached over gRPC behind the policies of ``policies.yaml``
(timeout, retries with an idempotency key, a circuit breaker, a bulkhead).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from examples.shop.models import (
    Charge,
    ChargeRequest,
    OrderAccepted,
    OrderPlaced,
    OrderView,
    PlaceOrder,
    Refund,
    RefundRequest,
)
from examples.shop.payments import charge, payments, refund
from wirework.errors import ConflictError, NotFoundError
from wirework.grpc import GrpcClient
from wirework.registry import Registry
from wirework.resilience import CircuitBreaker, Pipeline, build_pipelines, load_policies
from wirework.service import CallContext, Service
from wirework.store import Store, Transaction

orders = Service("orders")

POLICIES = Path(__file__).with_name("policies.yaml")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shop_orders (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL, "
    "sku TEXT NOT NULL, quantity INTEGER NOT NULL, total_cents INTEGER NOT NULL, "
    "status TEXT NOT NULL, detail TEXT NOT NULL, correlation_id TEXT NOT NULL)"
)


async def create_tables(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.execute(SCHEMA)


class Payments:
    """Orders' way to payments: the gRPC client, behind the policies for ``payments``."""

    def __init__(self, registry: Registry | None = None, tracer_provider: object = None) -> None:
        self.policy: Pipeline = build_pipelines(load_policies(POLICIES))["payments"]
        self.client = GrpcClient(
            payments,
            registry=registry or Registry.from_env(),
            policy=self.policy,
            tracer_provider=tracer_provider,
        )

    @property
    def breaker(self) -> CircuitBreaker:
        found = self.policy.find(CircuitBreaker)
        if found is None:
            raise LookupError("policies.yaml gives payments no circuit_breaker")
        return found

    async def charge(self, order: PlaceOrder, *, key: str) -> Charge:
        """Charge for ``order``; ``key`` makes a retry (or a repeated saga step) charge once."""
        return await self.client.call(
            charge,
            request=ChargeRequest(
                order_id=order.order_id, customer=order.customer, amount_cents=order.total_cents
            ),
            idempotency_key=key,
        )

    async def refund(self, order_id: str, *, charge_key: str, key: str) -> Refund:
        """Give back what ``charge_key`` charged, if anything; once per ``key``."""
        return await self.client.call(
            refund,
            request=RefundRequest(order_id=order_id, charge_key=charge_key),
            idempotency_key=key,
        )


orders.provide(Payments, Payments)


@orders.post("/v1/orders", status_code=202, idempotency="required")
async def submit_order(order: PlaceOrder) -> OrderAccepted:
    """Take the order: its row and its ``OrderPlaced`` commit together, or neither does."""
    async with orders.transaction() as tx:
        placed = await tx.publish(
            "orders.placed", OrderPlaced(**order.model_dump()), key=order.order_id
        )
        taken = await tx.execute(
            "INSERT INTO shop_orders (order_id, customer, sku, quantity, total_cents, status, "
            "detail, correlation_id) VALUES ($1, $2, $3, $4, $5, 'accepted', '', $6) "
            "ON CONFLICT (order_id) DO NOTHING",
            order.order_id,
            order.customer,
            order.sku,
            order.quantity,
            order.total_cents,
            placed.id,
        )
        if not taken:  # raising rolls the event back with the (absent) row
            raise ConflictError(
                f"order {order.order_id!r} exists already; GET /v1/orders/{order.order_id} "
                f"shows it, or choose a new order id"
            )
    return OrderAccepted(order_id=order.order_id, correlation_id=placed.id)


@orders.get("/v1/orders/{order_id}")
async def get_order(order_id: str, ctx: CallContext) -> OrderView:
    """Where an order stands: accepted, fulfilling, placed or rejected, and why."""
    async with orders.transaction() as tx:
        row = await tx.fetchrow(
            "SELECT status, detail FROM shop_orders WHERE order_id = $1", order_id
        )
    if row is None:
        raise NotFoundError(f"no order {order_id!r}; POST /v1/orders places one")
    return OrderView(order_id=order_id, status=row["status"], detail=row["detail"])


async def settle(
    tx: Transaction, order_id: str, status: str, detail: str, event: BaseModel
) -> bool:
    """Move an unsettled order to ``status``, with ``event`` through the outbox.

    Only the first call changes anything, so a saga step repeated after a
    crash publishes its event once. Called from a saga step, the event joins
    the order's flow: the step runs under the saga's lineage, whose cause and
    correlation are the order's ``OrderPlaced``.
    """
    changed = await tx.execute(
        "UPDATE shop_orders SET status = $2, detail = $3 WHERE order_id = $1 "
        "AND status NOT IN ('placed', 'rejected')",
        order_id,
        status,
        detail,
    )
    if changed:
        await tx.publish("orders.events", event, key=order_id)
    return bool(changed)
