"""Events written through the transactional outbox stay in the writer's trace.

The relay publishes a row after the commit, from no context at all; the
context travels in the stored envelope, put there by a PRODUCER span made
when the event is written (``instrument`` stamps the service's outbox).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tests.tracing.conftest import BrokerFactory, TracingFactory, flushed_trace
from wirework.service import Context, Service
from wirework.testing.conformance import wait_until
from wirework.tracing import SpanStore, instrument
from wirework.tracing.messaging import OUTBOX_ATTRIBUTE


class OrderPlaced(BaseModel):
    order_id: str


class Invoiced(BaseModel):
    order_id: str


async def test_outbox_events_join_the_writers_trace(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path, tmp_path: Path
) -> None:
    """A row written in a traced span, and one written by a traced idempotent handler
    (``ctx.tx``): each has its PRODUCER span in the writer's trace, and its consumers
    are children of it."""
    orders = Service("orders", broker=broker_for(), store=f"sqlite:///{tmp_path / 'o.db'}")
    billing = Service("billing", broker=broker_for(), store=f"sqlite:///{tmp_path / 'b.db'}")
    invoiced: list[str] = []

    @billing.subscribe("orders.placed", idempotent=True)
    async def bill(event: OrderPlaced, ctx: Context) -> None:
        await ctx.tx.publish("billing.invoiced", Invoiced(order_id=event.order_id))

    @orders.subscribe("billing.invoiced")
    async def note(event: Invoiced) -> None:
        invoiced.append(event.order_id)

    tracings = [tracing_for("orders"), tracing_for("billing")]
    instrument(orders, provider=tracings[0].provider)
    instrument(billing, provider=tracings[1].provider)
    tracer = tracings[0].provider.get_tracer("test")
    async with orders, billing:
        with tracer.start_as_current_span("POST /orders") as root:
            async with orders.transaction() as tx:
                written = await tx.publish("orders.placed", OrderPlaced(order_id="o-1"))
        await wait_until(lambda: invoiced == ["o-1"], what="the invoice noted")
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert trace_id in (written.traceparent or "")
    store = SpanStore(store_path, create=False)
    spans = await flushed_trace(tracings, store, trace_id, spans=5)
    by_id = {span.span_id: span for span in spans}
    created = {span.name: span for span in spans if span.kind == "PRODUCER"}
    assert set(created) == {"orders.placed publish", "billing.invoiced publish"}
    assert all(span.attributes.get(OUTBOX_ATTRIBUTE) is True for span in created.values())
    assert by_id[created["orders.placed publish"].parent_id or ""].name == "POST /orders"
    consumed = {span.name: span for span in spans if span.kind == "CONSUMER"}
    assert consumed["orders.placed process"].parent_id == created["orders.placed publish"].span_id
    handler = consumed["orders.placed process"]
    assert created["billing.invoiced publish"].parent_id == handler.span_id
    invoice = consumed["billing.invoiced process"]
    assert invoice.parent_id == created["billing.invoiced publish"].span_id
