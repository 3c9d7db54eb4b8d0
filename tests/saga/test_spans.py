"""Saga steps in traces: one trace from the span that started a saga through every attempt.

Each test has tracer providers of its own (never the global one) exporting to
memory, so the spans are read back as the SDK finished them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import orjson
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from tests.saga.test_saga import FAST, running
from wirework.brokers import connect
from wirework.brokers.base import Subscription
from wirework.envelope import Envelope, decode_wire
from wirework.resilience import RetrySettings
from wirework.saga import (
    Orchestrator,
    PermanentError,
    Saga,
    SagaLineage,
    SagaStatus,
    StepContext,
)
from wirework.service import Context, Service
from wirework.store import Store
from wirework.testing.conformance import wait_until
from wirework.testing.conformance.support import subscribed, take
from wirework.tracing import instrument
from wirework.tracing.propagation import format_traceparent


class Order(BaseModel):
    order_id: str


class Reserved(BaseModel):
    reservation: str


class ReserveStock(BaseModel):
    order_id: str


def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def saga_spans(spans: Sequence[ReadableSpan]) -> list[tuple[str, int, str | None]]:
    """(name, attempt, outcome) of the saga step spans, in the order they ended."""
    return [
        (span.name, _int(span, "wirework.attempt"), _str(span, "wirework.outcome"))
        for span in spans
        if span.name.startswith("saga ")
    ]


def _int(span: ReadableSpan, name: str) -> int:
    value = (span.attributes or {}).get(name)
    assert isinstance(value, int), (span.name, name, value)
    return value


def _str(span: ReadableSpan, name: str) -> str | None:
    value = (span.attributes or {}).get(name)
    return None if value is None else str(value)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_steps_and_a_compensation_are_children_of_the_starting_span(store: Store) -> None:
    """A saga started inside a span: every attempt's span (a retried and a failed charge, the
    compensation of reserve) is a child of it, with the saga's attributes and failures as
    errors; what the reserve step publishes is the step span's child and carries the saga
    id and the correlation id given at start, also through the outbox."""
    provider, exporter = traced()
    async with connect("memory://") as broker:
        shop = Service("shop", broker=broker)
        shop.use_publish(SagaLineage)
        instrument(shop, provider=provider)
        saga = Saga("order", Order)

        async def release(ctx: StepContext[Order], reserved: Reserved | None) -> None:
            assert reserved is not None
            assert ctx.compensating

        @saga.step("reserve", compensate=release)
        async def reserve(ctx: StepContext[Order]) -> Reserved:
            await shop.publish("inventory.reserve", ReserveStock(order_id=ctx.input.order_id))
            async with store.transaction() as tx:
                await tx.publish("inventory.audit", ReserveStock(order_id="o-1"), source="/shop")
            return Reserved(reservation="r-1")

        @saga.step("charge", retry=RetrySettings(max_attempts=3, base_delay=0.01))
        async def charge(ctx: StepContext[Order]) -> None:
            if ctx.attempt == 1:
                raise RuntimeError("the payment gateway timed out")
            raise PermanentError("card declined")

        orchestrator = Orchestrator(store, [saga], provider=provider, **FAST)  # type: ignore[arg-type]
        subscription = Subscription(topic="inventory.reserve", group="inventory")
        async with subscribed(broker, subscription) as deliveries:
            with provider.get_tracer("test").start_as_current_span("POST /orders") as request:
                saga_id = await orchestrator.start(
                    saga, Order(order_id="o-1"), correlation_id="c-9"
                )
            async with running(orchestrator):
                record = await orchestrator.result(saga_id, timeout=20)
            [delivery] = await take(deliveries, 1, ack=True)
    assert record.status is SagaStatus.COMPENSATED
    started = request.get_span_context()
    history = await orchestrator.history(saga_id)
    assert history.started["traceparent"] == format_traceparent(started)
    assert history.started["correlation_id"] == "c-9"

    spans = exporter.get_finished_spans()
    assert {span.context.trace_id for span in spans} == {started.trace_id}, "one trace"
    assert saga_spans(spans) == [
        ("saga order reserve", 1, "success"),
        ("saga order charge", 1, "retry"),
        ("saga order charge", 2, "failed"),
        ("saga order reserve compensate", 1, "success"),
    ]
    steps = [span for span in spans if span.name.startswith("saga ")]
    assert {parent_id(span) for span in steps} == {started.span_id}
    for span in steps:
        attributes = span.attributes or {}
        assert attributes["wirework.saga_id"] == saga_id
        assert attributes["wirework.saga"] == "order"
        assert attributes["wirework.step"] == span.name.split()[2]
        assert attributes["wirework.compensating"] is span.name.endswith("compensate")
        assert span.kind.name == "INTERNAL"
    reserve_span, retried, failed, compensation = steps
    assert reserve_span.status.status_code is StatusCode.UNSET
    assert compensation.status.status_code is StatusCode.UNSET
    assert retried.status.status_code is StatusCode.ERROR
    assert "timed out" in (retried.status.description or "")
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]

    [publish] = [span for span in spans if span.name == "inventory.reserve publish"]
    assert parent_id(publish) == reserve_span.context.span_id
    assert (publish.attributes or {})["wirework.saga_id"] == saga_id
    sent = decode_wire(delivery.message)
    assert sent.extensions["sagaid"] == saga_id
    assert sent.correlationid == "c-9"
    assert sent.causationid == saga_id, "started outside a handler: the saga is the cause"
    async with store.transaction() as tx:
        headers = orjson.loads(
            await tx.fetchval("SELECT headers FROM wirework_outbox WHERE topic = 'inventory.audit'")
        )
    assert headers["ce-correlationid"] == "c-9"


async def test_a_saga_resumed_by_another_orchestrator_stays_in_the_starting_trace(
    store: Store,
) -> None:
    """The first orchestrator stops during a step, which leaves the history a crash leaves
    (an attempt started, never ended); a second one, with a tracer provider of its own as
    another process would have, traces the lost attempt as unknown and the retry and the
    next step as children of the span that started the saga."""
    first_provider, first_exporter = traced()
    second_provider, second_exporter = traced()
    entered = asyncio.Event()
    saga = Saga("order", Order)

    @saga.step("reserve", retry=RetrySettings(max_attempts=3, base_delay=0.01))
    async def reserve(ctx: StepContext[Order]) -> None:
        if ctx.attempt == 1:
            entered.set()
            await asyncio.Event().wait()  # until the orchestrator stops

    @saga.step("ship")
    async def ship(ctx: StepContext[Order]) -> None:
        return None

    first = Orchestrator(store, [saga], provider=first_provider, **FAST)  # type: ignore[arg-type]
    with first_provider.get_tracer("test").start_as_current_span("POST /orders") as request:
        saga_id = await first.start(saga, Order(order_id="o-1"))
    async with running(first):
        await asyncio.wait_for(entered.wait(), 20)
    assert saga_spans(first_exporter.get_finished_spans()) == [
        ("saga order reserve", 1, "cancelled")
    ]

    second = Orchestrator(store, [saga], provider=second_provider, **FAST)  # type: ignore[arg-type]
    async with running(second):
        record = await second.result(saga_id, timeout=20)
    assert record.status is SagaStatus.COMPLETED
    started = request.get_span_context()
    spans = second_exporter.get_finished_spans()
    assert saga_spans(spans) == [
        ("saga order reserve", 1, "unknown"),
        ("saga order reserve", 2, "success"),
        ("saga order ship", 1, "success"),
    ]
    assert {span.context.trace_id for span in spans} == {started.trace_id}
    assert {parent_id(span) for span in spans} == {started.span_id}
    lost = spans[0]
    assert lost.status.status_code is StatusCode.ERROR
    assert "orchestrator stopped during it" in (lost.status.description or "")


async def test_a_saga_started_by_a_handler_joins_its_trace_and_correlation(store: Store) -> None:
    """Orders handles OrderPlaced and starts the saga; the step's request to inventory is one
    trace with it (publish, process, step, publish, process), and carries the handled
    message's correlation and, as its cause, the handled message."""
    provider, exporter = traced()
    reserved: list[Envelope] = []
    async with connect("memory://") as broker:
        orders = Service("orders", broker=broker)
        inventory = Service("inventory", broker=broker)
        saga = Saga("order", Order)

        @saga.step("reserve")
        async def reserve(ctx: StepContext[Order]) -> None:
            await orders.send("inventory.reserve", ReserveStock(order_id=ctx.input.order_id))

        orchestrator = Orchestrator(store, [saga], provider=provider, **FAST)  # type: ignore[arg-type]

        @orders.subscribe("orders.placed")
        async def placed(event: Order, ctx: Context) -> None:
            await orchestrator.start(saga, event, saga_id=f"order-{event.order_id}")

        @inventory.consume("inventory.reserve")
        async def on_reserve(command: ReserveStock, ctx: Context) -> None:
            reserved.append(ctx.envelope)

        orders.use_publish(SagaLineage)
        for service in (orders, inventory):
            instrument(service, provider=provider)
        async with orders, inventory, running(orchestrator):
            sent = await orders.publish("orders.placed", Order(order_id="o-7"))
            await wait_until(lambda: len(reserved) == 1, what="the reservation")
            await orchestrator.result("order-o-7", timeout=20)

    [command] = reserved
    assert command.correlationid == sent.correlationid
    assert command.causationid == sent.id
    assert command.extensions["sagaid"] == "order-o-7"
    spans = {span.name: span for span in exporter.get_finished_spans()}
    chain = [
        "orders.placed publish",
        "orders.placed process",
        "saga order reserve",
        "inventory.reserve publish",
        "inventory.reserve process",
    ]
    assert set(chain) <= set(spans)
    assert {spans[name].context.trace_id for name in chain} == {spans[chain[0]].context.trace_id}
    for parent, child in itertools.pairwise(chain):
        assert parent_id(spans[child]) == spans[parent].context.span_id, child
    assert (spans["inventory.reserve process"].attributes or {})["wirework.saga_id"] == (
        "order-o-7"
    )
