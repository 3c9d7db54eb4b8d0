"""Inventory: answers stock reservations (request-reply)."""

from __future__ import annotations

from examples.shop.models import ReleaseStock, ReserveStock, StockReservation
from wirework.service import Context, Service

inventory = Service("inventory")

#: Stock on hand; a real service keeps it in its store (issue: idempotency and the store).
STOCK = {"kettle": 3, "teapot": 1, "mug": 10}


@inventory.respond("inventory.reserve")
async def reserve(request: ReserveStock, ctx: Context) -> StockReservation:
    left = STOCK.get(request.sku, 0)
    if left < request.quantity:
        return StockReservation(order_id=request.order_id, reserved=False, left=left)
    STOCK[request.sku] = left - request.quantity
    return StockReservation(order_id=request.order_id, reserved=True, left=STOCK[request.sku])


@inventory.respond("inventory.release")
async def release(request: ReleaseStock, ctx: Context) -> StockReservation:
    """Give reserved units back (orders' compensation when payment fails)."""
    STOCK[request.sku] = STOCK.get(request.sku, 0) + request.quantity
    return StockReservation(order_id=request.order_id, reserved=False, left=STOCK[request.sku])
