"""Notifications: tells customers about their orders (pub/sub, group "notifications")."""

from __future__ import annotations

from examples.shop.models import OrderConfirmed, OrderPlaced, OrderRejected
from wirework.service import Context, Service

notifications = Service("notifications")
SENT: list[str] = []


@notifications.subscribe("orders.placed")
async def order_placed(event: OrderPlaced, ctx: Context) -> None:
    SENT.append(f"to {event.customer}: we have your order {event.order_id}")


@notifications.subscribe("orders.events")
async def order_confirmed(event: OrderConfirmed, ctx: Context) -> None:
    SENT.append(f"to {event.customer}: order {event.order_id} confirmed, on its way")


@notifications.subscribe("orders.events")
async def order_rejected(event: OrderRejected, ctx: Context) -> None:
    SENT.append(f"about {event.order_id}: sorry, {event.reason}")
