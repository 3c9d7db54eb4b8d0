"""Orders: takes PlaceOrder commands, reserves stock by request-reply, announces the result."""

from __future__ import annotations

from examples.shop.models import (
    OrderPlaced,
    OrderRejected,
    PlaceOrder,
    PrintLabel,
    ReserveStock,
    StockReservation,
)
from wirework.service import Context, Service

orders = Service("orders")


@orders.consume("orders.place", concurrency=4)
async def place_order(command: PlaceOrder, ctx: Context) -> None:
    reservation = await ctx.request(
        "inventory.reserve",
        ReserveStock(order_id=command.order_id, sku=command.sku, quantity=command.quantity),
        returns=StockReservation,
        timeout=5,
    )
    if not reservation.reserved:
        await ctx.publish(
            "orders.events",
            OrderRejected(order_id=command.order_id, reason=f"out of stock: {command.sku}"),
            key=command.order_id,
        )
        return
    placed = OrderPlaced(**command.model_dump())
    await ctx.publish("orders.events", placed, key=command.order_id)
    await ctx.send(
        "shipping.labels", PrintLabel(order_id=command.order_id, customer=command.customer)
    )
