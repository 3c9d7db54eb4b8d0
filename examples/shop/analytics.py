"""Analytics: books revenue (pub/sub, group "analytics"); one order is poison for it."""

from __future__ import annotations

from examples.shop.models import OrderConfirmed, OrderRejected
from wirework.consumer import RetryPolicy
from wirework.service import Context, Service

analytics = Service("analytics")
REVENUE_CENTS: list[int] = []
REJECTED: list[str] = []
QUICK_RETRIES = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2)


@analytics.subscribe("orders.events", retry=QUICK_RETRIES)
async def book_revenue(event: OrderConfirmed, ctx: Context) -> None:
    if event.total_cents < 0:
        raise ValueError(f"order {event.order_id} has a negative total; cannot book it")
    REVENUE_CENTS.append(event.total_cents)


@analytics.subscribe("orders.events", retry=QUICK_RETRIES)
async def count_rejection(event: OrderRejected, ctx: Context) -> None:
    REJECTED.append(event.order_id)
