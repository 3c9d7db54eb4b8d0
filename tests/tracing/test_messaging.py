"""One flow, one trace: publish, consume, request-reply and publish again, over real brokers.

Four services (shop, billing, inventory, shipping), each with its own tracer
provider as separate processes would have, all writing one span store; the
trace is read back from the store and every parent link is checked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from tests.tracing.conftest import (
    BrokerFactory,
    TracingFactory,
    flushed_lookup,
    flushed_trace,
)
from wirework.consumer import RetryPolicy
from wirework.envelope import Envelope, decode_wire, encode_binary, encode_structured
from wirework.errors import RemoteError
from wirework.service import Context, Service
from wirework.service.requests import ERROR_EVENT_TYPE
from wirework.testing.conformance import wait_until
from wirework.tracing import SpanRecord, SpanStore, instrument
from wirework.tracing import messaging as traced_messaging


class OrderPlaced(BaseModel):
    order_id: str


class CheckStock(BaseModel):
    order_id: str


class StockLevel(BaseModel):
    order_id: str
    available: bool


class Shipped(BaseModel):
    order_id: str


def by_name(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


async def test_one_trace_across_publish_consume_request_reply_and_publish(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    shop = Service("shop", broker=broker_for())
    billing = Service("billing", broker=broker_for())
    inventory = Service("inventory", broker=broker_for())
    shipping = Service("shipping", broker=broker_for())
    shipped: list[str] = []

    @billing.subscribe("orders")
    async def bill(event: OrderPlaced, ctx: Context) -> None:
        level = await ctx.request(
            "stock", CheckStock(order_id=event.order_id), returns=StockLevel, timeout=10
        )
        assert level.available
        await ctx.publish("shipments", Shipped(order_id=event.order_id), key=event.order_id)

    @inventory.respond("stock")
    async def check(ask: CheckStock) -> StockLevel:
        return StockLevel(order_id=ask.order_id, available=True)

    @shipping.subscribe("shipments")
    async def ship(event: Shipped) -> None:
        shipped.append(event.order_id)

    tracings = []
    for service in (shop, billing, inventory, shipping):
        tracing = tracing_for(service.name)
        tracings.append(tracing)
        instrument(service, provider=tracing.provider)

    async with shop, billing, inventory, shipping:
        sent = await shop.publish("orders", OrderPlaced(order_id="o-1"), key="o-1")
        await wait_until(lambda: shipped == ["o-1"], what="the order shipped")

    store = SpanStore(store_path, create=False)
    found = await flushed_lookup(tracings, lambda: store.find(key="o-1"))
    assert [t.root_name for t in found] == ["orders publish"]
    spans = await flushed_trace(tracings, store, found[0].trace_id, spans=7)
    named = by_name(spans)
    assert set(named) == {
        "orders publish",
        "orders process",
        "stock publish",
        "stock process",
        "(reply) publish",
        "shipments publish",
        "shipments process",
    }
    parents = {
        "orders publish": None,
        "orders process": "orders publish",
        "stock publish": "orders process",
        "stock process": "stock publish",
        "(reply) publish": "stock process",
        "shipments publish": "orders process",
        "shipments process": "shipments publish",
    }
    for name, parent in parents.items():
        expected = named[parent].span_id if parent else None
        assert named[name].parent_id == expected, name
    assert {s.trace_id for s in spans} == {found[0].trace_id}
    services = {name: span.service for name, span in named.items()}
    assert services == {
        "orders publish": "shop",
        "orders process": "billing",
        "stock publish": "billing",
        "stock process": "inventory",
        "(reply) publish": "inventory",
        "shipments publish": "billing",
        "shipments process": "shipping",
    }
    kinds = {name: span.kind for name, span in named.items()}
    assert kinds["orders publish"] == "PRODUCER"
    assert kinds["orders process"] == "CONSUMER"
    process = named["orders process"].attributes
    assert process["messaging.destination.name"] == "orders"
    assert process["messaging.consumer.group.name"] == "billing"
    assert process["messaging.operation.type"] == "process"
    assert process["messaging.message.id"] == sent.id
    assert process["wirework.correlation_id"] == sent.correlationid
    assert process["wirework.outcome"] == "success"
    assert process["wirework.attempt"] == 1
    assert named["orders publish"].attributes["messaging.operation.type"] == "send"
    assert named["(reply) publish"].attributes["messaging.destination.temporary"] is True
    assert not any(span.error for span in spans)
    # Every hop had its own parent id: the spans are seven distinct ids.
    assert len({s.span_id for s in spans}) == 7
    assert [t.trace_id for t in store.find(correlation_id=sent.correlationid)] == [
        found[0].trace_id
    ]


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-00000000000000000000000000000000-1234567890123456-01",
        "ff-12345678901234567890123456789012-1234567890123456-01",
        "00-12345678901234567890123456789012-1234567890123456-01-extra",
    ],
)
async def test_a_bad_traceparent_restarts_the_trace_and_the_message_is_handled(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path, traceparent: str
) -> None:
    producer = Service("outside", broker=broker_for())  # not traced: writes what it likes
    shipping = Service("shipping", broker=broker_for())
    handled: list[str] = []

    @shipping.subscribe("shipments")
    async def ship(event: Shipped) -> None:
        handled.append(event.order_id)

    tracing = tracing_for("shipping")
    instrument(shipping, provider=tracing.provider)
    async with producer, shipping:
        envelope = producer.envelope(Shipped(order_id="o-2"), key="o-2")
        envelope = envelope.model_copy(update={"traceparent": traceparent, "tracestate": "a=1"})
        await producer.publish_envelope("shipments", envelope, key="o-2")
        await wait_until(lambda: handled == ["o-2"], what="the message handled")

    store = SpanStore(store_path, create=False)
    (summary,) = await flushed_lookup([tracing], lambda: store.find(key="o-2"))
    (span,) = store.spans(summary.trace_id)
    assert span.name == "shipments process"
    assert span.parent_id is None
    assert span.trace_id not in ("0" * 32, "12345678901234567890123456789012")
    assert span.attributes["wirework.outcome"] == "success"


async def test_a_valid_traceparent_from_outside_is_continued(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    producer = Service("outside", broker=broker_for())
    shipping = Service("shipping", broker=broker_for())
    handled: list[str] = []

    @shipping.subscribe("shipments")
    async def ship(event: Shipped) -> None:
        handled.append(event.order_id)

    tracing = tracing_for("shipping")
    instrument(shipping, provider=tracing.provider)
    outside = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with producer, shipping:
        envelope = producer.envelope(Shipped(order_id="o-3"), key="o-3")
        envelope = envelope.model_copy(update={"traceparent": f"00-{outside}-00f067aa0ba902b7-01"})
        await producer.publish_envelope("shipments", envelope)
        await wait_until(lambda: handled == ["o-3"], what="the message handled")
    store = SpanStore(store_path, create=False)
    (span,) = await flushed_trace([tracing], store, outside, spans=1)
    assert span.parent_id == "00f067aa0ba902b7"


async def test_dev22_a_hundred_messages_keep_the_trace_each_with_a_parent_of_its_own(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    """DEV-22 across the broker: 100 messages published in one span keep its trace id in
    every consumer span, and each hop gets a new parent id (100 distinct ones)."""
    shop = Service("shop", broker=broker_for())
    shipping = Service("shipping", broker=broker_for())
    handled: list[str] = []

    @shipping.subscribe("shipments", concurrency=8)
    async def ship(event: Shipped) -> None:
        handled.append(event.order_id)

    tracings = [tracing_for("shop"), tracing_for("shipping")]
    instrument(shop, provider=tracings[0].provider)
    instrument(shipping, provider=tracings[1].provider)
    tracer = tracings[0].provider.get_tracer("test")
    async with shop, shipping:
        with tracer.start_as_current_span("checkout") as root:
            for n in range(100):
                await shop.publish("shipments", Shipped(order_id=f"o-{n}"))
        await wait_until(lambda: len(handled) == 100, what="100 messages handled")
    trace_id = format(root.get_span_context().trace_id, "032x")
    store = SpanStore(store_path, create=False)
    spans = await flushed_trace(tracings, store, trace_id, spans=1 + 100 + 100)
    consumed = [span for span in spans if span.kind == "CONSUMER"]
    published = {span.span_id for span in spans if span.kind == "PRODUCER"}
    assert len(consumed) == 100, "no consumer span left the trace"
    assert len({span.parent_id for span in consumed}) == 100
    assert {span.parent_id for span in consumed} == published


async def test_a_retried_message_has_a_span_per_attempt_and_errors_are_marked(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    shop = Service("shop", broker=broker_for())
    shipping = Service("shipping", broker=broker_for())
    attempts: list[int] = []

    @shipping.subscribe("shipments", retry=RetryPolicy(base_delay=0.01, jitter=0))
    async def ship(event: Shipped, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("carrier unreachable")

    tracings = [tracing_for("shop"), tracing_for("shipping")]
    instrument(shop, provider=tracings[0].provider)
    instrument(shipping, provider=tracings[1].provider)
    async with shop, shipping:
        sent = await shop.publish("shipments", Shipped(order_id="o-4"), key="o-4")
        await wait_until(lambda: attempts == [1, 2], what="two attempts")
    store = SpanStore(store_path, create=False)
    (summary,) = await flushed_lookup(
        tracings, lambda: store.find(correlation_id=sent.correlationid)
    )
    spans = await flushed_trace(tracings, store, summary.trace_id, spans=3)
    publish = next(s for s in spans if s.kind == "PRODUCER")
    processes = sorted(
        (s for s in spans if s.kind == "CONSUMER"), key=lambda s: s.attributes["wirework.attempt"]
    )
    assert [p.parent_id for p in processes] == [publish.span_id, publish.span_id]
    assert [p.attributes["wirework.outcome"] for p in processes] == ["error", "success"]
    assert [p.status for p in processes] == ["ERROR", "UNSET"]
    assert "carrier unreachable" in (processes[0].status_message or "")
    assert processes[0].events[0]["name"] == "exception"
    assert summary.errors == 1


async def test_a_failing_responder_marks_its_span_and_the_error_reply(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    shop = Service("shop", broker=broker_for())
    inventory = Service("inventory", broker=broker_for())

    @inventory.respond("stock")
    async def check(ask: CheckStock) -> StockLevel:
        raise LookupError(f"unknown order {ask.order_id}")

    tracings = [tracing_for("shop"), tracing_for("inventory")]
    instrument(shop, provider=tracings[0].provider)
    instrument(inventory, provider=tracings[1].provider)
    async with shop, inventory:
        with pytest.raises(RemoteError):
            await shop.request("stock", CheckStock(order_id="o-5"), timeout=10)
    store = SpanStore(store_path, create=False)
    (summary,) = await flushed_lookup(tracings, lambda: store.recent(5))
    spans = by_name(await flushed_trace(tracings, store, summary.trace_id, spans=3))
    assert spans["stock publish"].attributes["wirework.request"] is True
    assert spans["stock process"].parent_id == spans["stock publish"].span_id
    assert spans["stock process"].status == "ERROR"
    assert spans["stock process"].attributes["wirework.outcome"] == "error_reply"
    assert spans["(reply) publish"].parent_id == spans["stock process"].span_id
    assert spans["(reply) publish"].status == "ERROR"


def test_the_error_reply_type_matches_the_service_layer() -> None:
    assert traced_messaging._ERROR_REPLY_TYPE == ERROR_EVENT_TYPE


async def test_removing_the_instrumentation_stops_the_spans(
    broker_for: BrokerFactory, tracing_for: TracingFactory, store_path: Path
) -> None:
    shop = Service("shop", broker=broker_for())
    tracing = tracing_for("shop")
    instrumentation = instrument(shop, provider=tracing.provider)
    instrumentation.remove()
    async with shop:
        sent = await shop.publish("orders", OrderPlaced(order_id="o-6"))
    assert sent.traceparent is None
    await asyncio.to_thread(tracing.force_flush, 5.0)
    assert tracing.stats()["store"].queued == 0


def test_the_envelope_carrying_a_trace_is_the_model_copy_it_replaces() -> None:
    """``Envelope.carrying`` (the publish middleware's per-message copy) builds by hand
    what ``model_copy(update=...)`` did: equal, the same fields set, the same wire."""
    original = Envelope.new(
        "OrderPlaced", OrderPlaced(order_id="o-1"), source="shop", key="o-1"
    ).model_copy(update={"extensions": {"sagaid": "s-1"}, "tracestate": "old=1"})
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for tracestate in ("ww=1", None):
        carried = original.carrying(traceparent, tracestate)
        copied = original.model_copy(update={"traceparent": traceparent, "tracestate": tracestate})
        assert carried == copied
        assert carried.model_fields_set == copied.model_fields_set
        assert carried.model_dump(exclude_unset=True) == copied.model_dump(exclude_unset=True)
        assert encode_binary(carried) == encode_binary(copied)
        assert decode_wire(encode_structured(carried)) == copied
    assert (original.traceparent, original.tracestate) == (None, "old=1")  # left as it was
    with pytest.raises(ValidationError):
        carried.traceparent = None  # type: ignore[misc]  # still frozen
