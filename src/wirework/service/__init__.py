"""The service model: typed handlers on queues, topics and request-reply.

::

    svc = Service("inventory", broker="sqlite:///shop.db")

    @svc.respond("inventory.reserve")
    async def reserve(request: Reserve, ctx: Context) -> Reserved:
        ...

    @svc.subscribe("orders.events")
    async def on_order(event: OrderPlaced, ctx: Context) -> None:
        await ctx.publish("inventory.events", StockChanged(...))

    @svc.get("/v1/stock/{sku}")           # REST and gRPC from one handler
    async def stock(sku: str, ctx: CallContext) -> Stock:
        ...
"""

from wirework.service.binding import Binding as Binding
from wirework.service.context import Context as Context
from wirework.service.endpoints import CallContext as CallContext
from wirework.service.endpoints import Endpoint as Endpoint
from wirework.service.handlers import event_type as event_type
from wirework.service.service import Service as Service

__all__ = ["Binding", "CallContext", "Context", "Endpoint", "Service", "event_type"]
