"""02 · Fan-out: every subscribing service gets its own copy of each event.

``email`` and ``analytics`` subscribe to ``orders.events``, each in its own group
(named after the service), so each sees every order; its instances would share them (01).
Run: ``python examples/02_fan_out.py`` (SQLite in a temp directory, or $WIREWORK_BROKER).
"""

import asyncio
import os
import tempfile
from collections import Counter

from pydantic import BaseModel

from wirework import connect
from wirework.service import Context, Service

ORDERS = {"o-1": 3900, "o-2": 2500, "o-3": 7800}


class OrderPlaced(BaseModel):
    order_id: str
    total_cents: int


async def main(url: str) -> None:
    copies: Counter[str] = Counter()
    all_seen = asyncio.Event()

    def seen(ctx: Context, what: str) -> None:
        print(f"{ctx.group:<9} got {ctx.message_id[:8]}: {what}")
        copies[ctx.group] += 1
        if copies.total() == 2 * len(ORDERS):
            all_seen.set()

    async with connect(url) as broker:
        email, analytics = Service("email", broker=broker), Service("analytics", broker=broker)

        @email.subscribe("orders.events")
        async def confirm(event: OrderPlaced, ctx: Context) -> None:
            seen(ctx, f"confirmation for {event.order_id} sent")

        @analytics.subscribe("orders.events")
        async def book(event: OrderPlaced, ctx: Context) -> None:
            seen(ctx, f"{event.total_cents / 100:.2f} booked for {event.order_id}")

        async with email, analytics, Service("orders", broker=broker) as orders:
            for order_id, cents in ORDERS.items():
                placed = OrderPlaced(order_id=order_id, total_cents=cents)
                await orders.publish("orders.events", placed)
            async with asyncio.timeout(10):
                await all_seen.wait()
    got = ", ".join(f"{group} got {n}" for group, n in sorted(copies.items()))
    print(f"{len(ORDERS)} events published; {got}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(os.environ.get("WIREWORK_BROKER") or f"sqlite:///{tmp}/wirework.db"))
