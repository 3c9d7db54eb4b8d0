"""Shipping: a pool of label printers competing for one queue."""

from __future__ import annotations

import asyncio

from examples.shop.models import PrintLabel
from wirework.service import Context, Service

PRINTED: dict[str, list[str]] = {}


def shipping_worker(name: str) -> Service:
    """One worker of the pool; run several and they share the queue."""
    worker = Service("shipping")

    # prefetch=1: a worker holds only the label it prints, so an idle one takes the next.
    @worker.consume("shipping.labels", concurrency=1, prefetch=1)
    async def print_label(command: PrintLabel, ctx: Context) -> None:
        await asyncio.sleep(0.25)  # a printer is slow, so the other worker takes the next
        PRINTED.setdefault(name, []).append(command.order_id)

    return worker
