"""The fulfilment saga: hold the stock, charge the customer, queue the label, confirm.

Orchestrated, in orders, from the store: every step is recorded before it is
acted on, so an orders process killed mid-order is resumed by the next one.
When a step fails for good, what was done is undone in reverse order:

=========  ==================================  ========================================
step       action                              compensation
=========  ==================================  ========================================
order      mark the order ``fulfilling``       mark it ``rejected``, ``OrderRejected``
reserve    ``inventory.reserve`` (request)     ``inventory.release`` (request)
charge     payments ``Charge`` (gRPC)          payments ``Refund`` (gRPC)
ship       a ``PrintLabel`` to the label queue
confirm    mark it ``placed``, ``OrderConfirmed``
=========  ==================================  ========================================

Each step passes ``ctx.idempotency_key`` (saga id + step) to the participant,
or is keyed by the order (inventory), so a repeat after a crash is absorbed.
The saga's id is the order id, so a redelivered ``OrderPlaced`` starts nothing
new. Beside it, ``OrderPlaced`` and the outcome events fan out by pub/sub to
notifications, analytics and inventory (choreography, followed with
``wirework flow``).
"""

from __future__ import annotations

from examples.shop.models import (
    Charge,
    OrderConfirmed,
    OrderPlaced,
    OrderRejected,
    PlaceOrder,
    PrintLabel,
    ReleaseStock,
    ReserveStock,
    StockReservation,
)
from examples.shop.orders import Payments, orders, settle
from wirework.resilience.settings import RetrySettings
from wirework.saga import Orchestrator, PermanentError, Saga, StepContext, idempotency_key
from wirework.service import Context

fulfilment = Saga("fulfilment", PlaceOrder)

#: Two quick attempts per step: payments' own client already retries within a call.
QUICK = RetrySettings(max_attempts=2, base_delay=0.05, max_delay=0.2)
#: Seconds inventory has to answer a request.
ASK_TIMEOUT = 4.0


def sagas() -> Orchestrator:
    """The orchestrator in orders' process (``orders.resolve(Orchestrator, ...)``)."""
    orchestrator: Orchestrator = orders.resolve(Orchestrator, "the fulfilment saga")
    return orchestrator


async def reject_order(ctx: StepContext[PlaceOrder], _: None) -> None:
    """The last compensation: tell everyone the order will not ship, and why."""
    record = (await sagas().history(ctx.saga_id)).saga
    reason = record.error or "fulfilment failed"
    async with orders.transaction() as tx:
        await settle(
            tx,
            ctx.input.order_id,
            "rejected",
            reason,
            OrderRejected(order_id=ctx.input.order_id, reason=reason),
        )


@fulfilment.step("order", compensate=reject_order, retry=QUICK)
async def open_order(ctx: StepContext[PlaceOrder]) -> None:
    async with orders.transaction() as tx:
        await tx.execute(
            "UPDATE shop_orders SET status = 'fulfilling' WHERE order_id = $1 "
            "AND status = 'accepted'",
            ctx.input.order_id,
        )


async def release(ctx: StepContext[PlaceOrder], _: StockReservation | None) -> None:
    """Give the held units back; inventory keys releases by order, so twice is once."""
    order = ctx.input
    await orders.request(
        "inventory.release",
        ReleaseStock(order_id=order.order_id, sku=order.sku, quantity=order.quantity),
        returns=StockReservation,
        timeout=ASK_TIMEOUT,
    )


@fulfilment.step("reserve", compensate=release, timeout=5, retry=QUICK)
async def reserve(ctx: StepContext[PlaceOrder]) -> StockReservation:
    order = ctx.input
    held = await orders.request(
        "inventory.reserve",
        ReserveStock(order_id=order.order_id, sku=order.sku, quantity=order.quantity),
        returns=StockReservation,
        timeout=ASK_TIMEOUT,
    )
    if not held.reserved:
        raise PermanentError(f"out of stock: {order.sku} ({held.left} left)")
    return held


async def refund(ctx: StepContext[PlaceOrder], _: Charge | None) -> None:
    """Give back what the charge took, even when its answer was lost (a timeout)."""
    pay: Payments = orders.resolve(Payments, "the fulfilment saga")
    await pay.refund(
        ctx.input.order_id,
        charge_key=idempotency_key(ctx.saga_id, "charge"),
        key=ctx.idempotency_key,
    )


@fulfilment.step("charge", compensate=refund, timeout=5, retry=QUICK)
async def charge(ctx: StepContext[PlaceOrder]) -> Charge:
    # A declined card is PreconditionFailedError: a definite answer, not retried.
    pay: Payments = orders.resolve(Payments, "the fulfilment saga")
    return await pay.charge(ctx.input, key=ctx.idempotency_key)


@fulfilment.step("ship", retry=QUICK)
async def ship(ctx: StepContext[PlaceOrder]) -> None:
    order = ctx.input
    # No key: labels need no order among themselves, so any idle printer takes the next.
    await orders.send(
        "shipping.labels", PrintLabel(order_id=order.order_id, customer=order.customer)
    )


@fulfilment.step("confirm", retry=QUICK)
async def confirm(ctx: StepContext[PlaceOrder]) -> None:
    order, charged = ctx.input, ctx.output(charge)
    if charged is None:  # typed optional only because a compensation may get None
        raise PermanentError(f"no charge is recorded for order {order.order_id}")
    async with orders.transaction() as tx:
        await settle(
            tx,
            order.order_id,
            "placed",
            f"charge {charged.charge_id}",
            OrderConfirmed(**order.model_dump(), charge_id=charged.charge_id),
        )


@orders.subscribe("orders.placed", group="fulfilment")
async def start_fulfilment(event: OrderPlaced, ctx: Context) -> None:
    """Start the order's saga. Not under the inbox: the saga's id is the order's, so a
    redelivered event finds the saga recorded and starts nothing (and the saga's
    own records would need the store's one transaction the inbox holds)."""
    await sagas().start(fulfilment, PlaceOrder(**event.model_dump()), saga_id=event.order_id)
