"""The service model: typed handlers on queues, topics and request-reply.

::

    svc = Service("inventory", broker="sqlite:///shop.db")

    @svc.respond("inventory.reserve")
    async def reserve(request: Reserve, ctx: Context) -> Reserved:
        ...

    @svc.subscribe("orders.events")
    async def on_order(event: OrderPlaced, ctx: Context) -> None:
        await ctx.publish("inventory.events", StockChanged(...))
"""

from wirework.service.binding import Binding as Binding
from wirework.service.context import Context as Context
from wirework.service.handlers import event_type as event_type
from wirework.service.service import Service as Service

__all__ = ["Binding", "Context", "Service", "event_type"]
