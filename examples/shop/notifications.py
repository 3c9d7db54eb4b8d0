"""Notifications: tells customers about their orders (pub/sub, group "notifications")."""

from __future__ import annotations

from examples.shop.models import OrderPlaced, OrderRejected
from wirework.service import Context, Service

notifications = Service("notifications")
SENT: list[str] = []


@notifications.subscribe("orders.events")
async def order_placed(event: OrderPlaced, ctx: Context) -> None:
    SENT.append(f"to {event.customer}: order {event.order_id} confirmed")


@notifications.subscribe("orders.events")
async def order_rejected(event: OrderRejected, ctx: Context) -> None:
    SENT.append(f"about {event.order_id}: sorry, {event.reason}")
