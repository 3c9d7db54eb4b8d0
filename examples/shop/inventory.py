"""Inventory: holds stock for orders (request-reply) and books sales (an idempotent consumer).

Stock lives in inventory's own store. A reservation is keyed by its order,
so the fulfilment saga may repeat ``inventory.reserve`` or
``inventory.release`` (a retry, an orchestrator restarted mid-step) and get
the first answer again instead of holding the units twice. A sale is booked
when ``OrderConfirmed`` arrives; that update (``reserved - n, sold + n``) is
not idempotent by itself, so the handler runs under the inbox
(``idempotent=True``): a redelivered copy is acked without booking again.
"""

from __future__ import annotations

from collections.abc import Mapping

from examples.shop.models import (
    OrderConfirmed,
    OrderRejected,
    ReleaseStock,
    ReserveStock,
    StockReservation,
)
from wirework.service import Context, Service
from wirework.store import Store, Transaction

inventory = Service("inventory")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shop_stock (sku TEXT PRIMARY KEY, on_hand INTEGER NOT NULL, "
    "reserved INTEGER NOT NULL DEFAULT 0, sold INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS shop_reservations (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, "
    "quantity INTEGER NOT NULL, state TEXT NOT NULL)",
)


async def stock_up(store: Store, stock: Mapping[str, int]) -> None:
    """Create inventory's tables and set the units on hand (the demo's opening stock)."""
    async with store.transaction() as tx:
        for statement in SCHEMA:
            await tx.execute(statement)
        for sku, units in stock.items():
            await tx.upsert("shop_stock", ["sku"], {"sku": sku, "on_hand": units})


async def on_hand(store: Store) -> dict[str, tuple[int, int, int]]:
    """Per sku: units on hand, reserved and sold."""
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT sku, on_hand, reserved, sold FROM shop_stock ORDER BY sku")
    return {row["sku"]: (row["on_hand"], row["reserved"], row["sold"]) for row in rows}


async def _answer(tx: Transaction, order_id: str, sku: str) -> StockReservation:
    row = await tx.fetchrow("SELECT state FROM shop_reservations WHERE order_id = $1", order_id)
    left = await tx.fetchval("SELECT on_hand FROM shop_stock WHERE sku = $1", sku)
    held = row is not None and row["state"] in ("held", "sold")
    return StockReservation(order_id=order_id, reserved=held, left=left or 0)


@inventory.respond("inventory.reserve")
async def reserve(request: ReserveStock, ctx: Context) -> StockReservation:
    """Hold units for an order, or say there are not enough; once per order."""
    async with inventory.store.transaction() as tx:
        known = await tx.fetchval(
            "SELECT 1 FROM shop_reservations WHERE order_id = $1", request.order_id
        )
        if known is None:
            taken = await tx.execute(
                "UPDATE shop_stock SET on_hand = on_hand - $2, reserved = reserved + $2 "
                "WHERE sku = $1 AND on_hand >= $2",
                request.sku,
                request.quantity,
            )
            await tx.execute(
                "INSERT INTO shop_reservations (order_id, sku, quantity, state) "
                "VALUES ($1, $2, $3, $4)",
                request.order_id,
                request.sku,
                request.quantity,
                "held" if taken else "refused",
            )
        return await _answer(tx, request.order_id, request.sku)


@inventory.respond("inventory.release")
async def release(request: ReleaseStock, ctx: Context) -> StockReservation:
    """Give held units back (the saga's compensation); a second release changes nothing."""
    async with inventory.store.transaction() as tx:
        released = await tx.execute(
            "UPDATE shop_reservations SET state = 'released' "
            "WHERE order_id = $1 AND state = 'held'",
            request.order_id,
        )
        if released:
            await tx.execute(
                "UPDATE shop_stock SET on_hand = on_hand + $2, reserved = reserved - $2 "
                "WHERE sku = $1",
                request.sku,
                request.quantity,
            )
        return await _answer(tx, request.order_id, request.sku)


@inventory.subscribe("orders.events", idempotent=True)
async def book_sale(event: OrderConfirmed, ctx: Context) -> None:
    """Held units become sold; the inbox makes this once per event, however often it comes."""
    await ctx.tx.execute(
        "UPDATE shop_stock SET reserved = reserved - $2, sold = sold + $2 WHERE sku = $1",
        event.sku,
        event.quantity,
    )
    await ctx.tx.execute(
        "UPDATE shop_reservations SET state = 'sold' WHERE order_id = $1", event.order_id
    )


@inventory.subscribe("orders.events", idempotent=True)
async def order_rejected(event: OrderRejected, ctx: Context) -> None:
    """Nothing to book: the saga already released what it held."""
