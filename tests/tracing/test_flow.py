"""``wirework flow``: a choreographed flow rebuilt from the span store as its causation tree.

One choreography runs on the memory broker with every service traced into one
span store: an HTTP call places an order; billing and analytics (two groups)
get the event; billing asks inventory for stock (request-reply) and asks for an
invoice, which invoicing fails to make until it is dead-lettered; analytics
fails twice, then succeeds. The tree is checked from ``load_flow`` and from the
command line; the tree builder alone is checked with spans missing.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel
from rich.console import Console
from typer.testing import CliRunner

from tests.tracing.conftest import TracingFactory
from wirework.brokers import connect
from wirework.cli.flow import flow_tree
from wirework.cli.main import app
from wirework.consumer import RetryPolicy
from wirework.service import Context, Service
from wirework.service.requests import ERROR_EVENT_TYPE
from wirework.testing.conformance import wait_until
from wirework.tracing import SpanRecord, SpanStore, instrument, server_span
from wirework.tracing.flow import Flow, Handling, Message, build_flow, load_flow


class OrderPlaced(BaseModel):
    order_id: str


class CheckStock(BaseModel):
    order_id: str


class StockLevel(BaseModel):
    available: bool


class InvoiceRequested(BaseModel):
    order_id: str


T = TypeVar("T")

FAST = RetryPolicy(base_delay=0.01, jitter=0)

#: Spans carrying the flow's correlation id: 4 publishes (order, stock request, its
#: reply, invoice) and 7 consumes (billing, inventory, analytics x3, invoicing x2).
FLOW_SPANS = 11


async def run_choreography(tracing_for: TracingFactory, store_path: Path) -> str:
    """Run the shop's choreography once; its correlation id once every span is stored."""
    broker = connect("memory://")
    shop = Service("shop", broker=broker)
    billing = Service("billing", broker=broker)
    inventory = Service("inventory", broker=broker)
    analytics = Service("analytics", broker=broker)
    invoicing = Service("invoicing", broker=broker)
    recorded: list[int] = []
    invoiced: list[int] = []

    @billing.subscribe("orders", retry=FAST)
    async def bill(event: OrderPlaced, ctx: Context) -> None:
        level = await ctx.request(
            "stock", CheckStock(order_id=event.order_id), returns=StockLevel, timeout=10
        )
        assert level.available
        await ctx.publish("invoices", InvoiceRequested(order_id=event.order_id))

    @inventory.respond("stock")
    async def check(ask: CheckStock) -> StockLevel:
        return StockLevel(available=True)

    @analytics.subscribe("orders", retry=FAST)
    async def record(event: OrderPlaced, ctx: Context) -> None:
        recorded.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"warehouse offline (attempt {ctx.attempt})")

    @invoicing.subscribe("invoices", retry=FAST.model_copy(update={"max_attempts": 2}))
    async def invoice(event: InvoiceRequested, ctx: Context) -> None:
        invoiced.append(ctx.attempt)
        raise ValueError(f"no tax rate for order {event.order_id}")

    services = (shop, billing, inventory, analytics, invoicing)
    tracings = [tracing_for(service.name) for service in services]
    for service, tracing in zip(services, tracings, strict=True):
        instrument(service, provider=tracing.provider)
    try:
        async with shop, billing, inventory, analytics, invoicing:
            with server_span("POST /v1/orders", {}, provider=tracings[0].provider):
                sent = await shop.publish("orders", OrderPlaced(order_id="o-1"))
            await wait_until(
                lambda: recorded == [1, 2, 3] and invoiced == [1, 2], what="every attempt"
            )
    finally:
        await broker.aclose()
    assert sent.correlationid is not None
    store = SpanStore(store_path, create=False)

    async def stored() -> bool:
        for tracing in tracings:
            await asyncio.to_thread(tracing.force_flush, 5.0)
        return len(store.correlated(sent.correlationid or "")) >= FLOW_SPANS

    await wait_until(stored, what=f"{FLOW_SPANS} spans of the flow in the span store")
    store.close()
    return sent.correlationid


@pytest.fixture
async def flow_id(tracing_for: TracingFactory, store_path: Path) -> str:
    return await run_choreography(tracing_for, store_path)


def handling(message: Message, service: str) -> Handling:
    (found,) = [h for h in message.handlings if h.service == service]
    return found


def only(items: list[T]) -> T:
    assert len(items) == 1, items
    return items[0]


async def test_the_choreography_is_rebuilt_as_its_causation_tree(
    flow_id: str, store_path: Path
) -> None:
    store = SpanStore(store_path, create=False)
    flow = load_flow(store, flow_id)
    assert flow is not None
    assert flow.status == "failed"
    assert flow.messages == 4
    assert flow.orphans == []
    assert set(flow.services) == {"shop", "billing", "inventory", "analytics", "invoicing"}

    order = only(flow.roots)
    assert (order.type, order.topic, order.publisher) == ("OrderPlaced", "orders", "shop")
    assert order.causation_id is None
    assert order.trigger is not None
    assert (order.trigger.service, order.trigger.name) == ("shop", "POST /v1/orders")
    assert order.trigger.kind == "SERVER"
    assert {h.service for h in order.handlings} == {"billing", "analytics"}

    analytics = handling(order, "analytics")
    assert (analytics.group, analytics.outcome, analytics.attempts) == ("analytics", "success", 3)
    assert (analytics.handler or "").endswith("record")
    assert [a.outcome for a in analytics.attempt_list] == ["error", "error", "success"]
    assert "warehouse offline (attempt 2)" in (analytics.error or "")
    assert analytics.children == []

    billing = handling(order, "billing")
    assert (billing.outcome, billing.attempts) == ("success", 1)
    assert (billing.handler or "").endswith("bill")
    request, invoice = billing.children
    assert (request.type, request.topic, request.request) == ("CheckStock", "stock", True)
    assert request.causation_id == order.id
    inventory = handling(request, "inventory")
    assert inventory.outcome == "success"
    reply = only(inventory.children)
    assert (reply.type, reply.reply, reply.publisher) == ("StockLevel", True, "inventory")
    assert reply.topic is None
    assert reply.handlings == []

    assert (invoice.type, invoice.topic, invoice.publisher) == (
        "InvoiceRequested",
        "invoices",
        "billing",
    )
    invoicing = handling(invoice, "invoicing")
    assert (invoicing.outcome, invoicing.attempts) == ("dead_lettered", 2)
    assert "ValueError: no tax rate for order o-1" in (invoicing.error or "")

    # Times run from the flow's start: the trigger first, each message after its cause.
    assert order.trigger.start == 0
    assert order.published is not None
    assert order.published >= 0
    assert invoice.published is not None
    assert invoice.published > order.published
    assert invoicing.start > invoice.published
    assert [m.id for m in flow.walk()] == [order.id, request.id, reply.id, invoice.id]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["flow", *args])
    return result.exit_code, result.stdout, result.stderr


def line(out: str, text: str) -> str:
    (found,) = [row for row in out.splitlines() if text in row]
    return found


async def test_the_command_draws_the_tree(flow_id: str, store_path: Path) -> None:
    code, out, err = invoke(flow_id[:10], "--store", str(store_path))
    assert code == 0, err
    assert f"flow {flow_id}" in line(out, "4 messages")
    assert "failed" in line(out, "4 messages")
    rows = {
        name: line(out, text)
        for name, text in {
            "trigger": "shop: POST /v1/orders",
            "order": "OrderPlaced on orders from shop",
            "billing": "billing · bill [billing]",
            "request": "request CheckStock on stock from billing",
            "inventory": "inventory · check [stock]",
            "reply": "reply StockLevel from inventory",
            "invoice": "InvoiceRequested on invoices from billing",
            "invoicing": "invoicing · invoice [invoicing]",
            "analytics": "analytics · record [analytics]",
        }.items()
    }
    assert " ok " in rows["billing"]
    assert "ok after 3 attempts" in rows["analytics"]
    assert "✗ invoicing" in rows["invoicing"]
    assert "dead-lettered after 2 attempts" in rows["invoicing"]
    assert "ValueError: no tax rate for order o-1" in out
    assert "earlier attempt failed: ConnectionError: warehouse offline (attempt 2)" in out
    # Each node is drawn inside its parent (the tree's guides come before the text).
    indent = {name: len(row) - len(row.lstrip(" │├└─")) for name, row in rows.items()}
    assert indent["trigger"] < indent["order"] < indent["billing"] < indent["request"]
    assert indent["request"] < indent["inventory"] < indent["reply"]
    assert indent["request"] < indent["reply"]
    assert indent["invoice"] == indent["request"] < indent["invoicing"]
    assert indent["analytics"] == indent["billing"]


async def test_the_command_prints_json(flow_id: str, store_path: Path) -> None:
    code, out, _ = invoke(flow_id, "--json", "--store", str(store_path))
    assert code == 0
    document = json.loads(out)
    assert document["correlation_id"] == flow_id
    assert document["status"] == "failed"
    (order,) = document["roots"]
    assert order["trigger"]["name"] == "POST /v1/orders"
    outcomes = {h["service"]: (h["outcome"], h["attempts"]) for h in order["handlings"]}
    assert outcomes == {"billing": ("success", 1), "analytics": ("success", 3)}
    flow = Flow.model_validate(document)
    assert [m.type for m in flow.walk()] == [
        "OrderPlaced",
        "CheckStock",
        "StockLevel",
        "InvoiceRequested",
    ]


async def test_the_last_flows_are_listed(flow_id: str, store_path: Path) -> None:
    code, out, _ = invoke("--last", "5", "--store", str(store_path))
    assert code == 0
    row = line(out, flow_id)
    assert "shop: POST /v1/orders" in row
    assert " 4 " in row
    assert "failed" in row
    code, out, _ = invoke("--last", "5", "--json", "--store", str(store_path))
    (summary,) = json.loads(out)
    assert (summary["correlation_id"], summary["messages"]) == (flow_id, 4)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nope"], 1, "no flow with correlation id 'nope'"),
        (["abc"], 1, "at least 8 hex characters"),
        (["abc", "--last", "2"], 2, "not both"),
    ],
)
def test_mistakes_get_one_line_and_an_exit_code(
    store_path: Path, args: list[str], code: int, message: str
) -> None:
    write(store_path, [publish("m1", end=1)])
    got, _, err = invoke(*args, "--store", str(store_path))
    assert got == code
    assert message in err


def test_an_ambiguous_prefix_names_the_matches(store_path: Path) -> None:
    write(
        store_path,
        [
            publish("m1", end=1, correlation="abcdef0123aa"),
            publish("m2", end=2, correlation="abcdef0123bb"),
        ],
    )
    code, _, err = invoke("abcdef0123", "--store", str(store_path))
    assert code == 1
    assert "abcdef0123aa" in err
    assert "abcdef0123bb" in err


def test_with_no_argument_the_recent_flows_are_listed(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREWORK_SPAN_STORE", str(store_path))
    write(store_path, [publish("m1", end=1, correlation="")])  # no correlation id: no flow
    code, out, _ = invoke()
    assert code == 0
    assert "No flows yet." in out
    write(store_path, [publish("m2", end=2)])
    code, out, _ = invoke()
    assert code == 0
    assert "Typem2" in line(out, CORRELATION)


def test_a_missing_store_is_named(tmp_path: Path) -> None:
    code, _, err = invoke("abcdef0123", "--store", str(tmp_path / "none.db"))
    assert code == 1
    assert "no span store at" in err
    assert not (tmp_path / "none.db").exists()


# -- the tree builder alone, on spans made by hand ------------------------------------------

CORRELATION = "c0ffee00c0ffee00"
#: Hand-made spans end a few milliseconds after this (recent: the store prunes old spans).
BASE = time.time_ns()
MS = 1_000_000
_ids: Iterator[int] = iter(range(1, 1_000_000))


def span(
    kind: str,
    message_id: str,
    *,
    end: int,
    service: str = "svc",
    cause: str | None = None,
    parent: str | None = None,
    span_id: str | None = None,
    error: str | None = None,
    correlation: str = CORRELATION,
    **attributes: Any,
) -> SpanRecord:
    values: dict[str, Any] = {
        "messaging.message.id": message_id,
        "cloudevents.event_type": f"Type{message_id}",
        **{k.replace("__", "."): v for k, v in attributes.items()},
    }
    if cause is not None:
        values["wirework.causation_id"] = cause
    if correlation:
        values["wirework.correlation_id"] = correlation
    return SpanRecord(
        trace_id="ab" * 16,
        span_id=span_id or f"{next(_ids):016x}",
        parent_id=parent,
        name=f"{message_id} {kind.lower()}",
        kind=kind,
        service=service,
        start_ns=BASE + end * MS - MS // 2,
        end_ns=BASE + end * MS,
        status="ERROR" if error else "UNSET",
        status_message=error,
        attributes=values,
    )


def publish(message_id: str, *, end: int, topic: str = "topic", **kwargs: Any) -> SpanRecord:
    return span("PRODUCER", message_id, end=end, messaging__destination__name=topic, **kwargs)


def consume(
    message_id: str,
    *,
    end: int,
    group: str = "group",
    attempt: int = 1,
    outcome: str = "success",
    **kwargs: Any,
) -> SpanRecord:
    return span(
        "CONSUMER",
        message_id,
        end=end,
        messaging__consumer__group__name=group,
        wirework__attempt=attempt,
        wirework__outcome=outcome,
        **kwargs,
    )


def write(path: Path, spans: list[SpanRecord]) -> None:
    store = SpanStore(path)
    store.write(spans)
    store.close()


def drawn(flow: Flow) -> str:
    text = io.StringIO()
    Console(file=text, width=200, color_system=None).print(flow_tree(flow))
    return text.getvalue()


def build(spans: list[SpanRecord], context: list[SpanRecord] | None = None) -> Flow:
    return build_flow(spans, correlation_id=CORRELATION, context=context or [])


def test_a_message_whose_cause_left_no_span_is_an_orphan_beside_the_root() -> None:
    flow = build(
        [
            publish("a", end=1, service="shop"),
            consume("a", end=2, service="billing"),
            # "c" was published while "x" was handled, and x left no span (sampled out).
            publish("c", end=5, service="shipping", cause="x"),
            consume("c", end=6, service="mail"),
        ]
    )
    assert [m.id for m in flow.roots] == ["a"]
    orphan = only(flow.orphans)
    assert (orphan.id, orphan.cause_recorded, orphan.causation_id) == ("c", False, "x")
    assert handling(orphan, "mail").outcome == "success"
    assert flow.status == "ok"
    assert "cause not recorded (id x)" in line(drawn(flow), "Typec")


def test_a_message_known_only_from_its_consumer_hangs_under_its_cause() -> None:
    flow = build(
        [
            publish("a", end=1, service="shop"),
            consume("a", end=2, service="billing"),
            # b's publish span is missing; its consume span still names its cause.
            consume("b", end=4, service="shipping", cause="a", messaging__destination__name="b.q"),
        ]
    )
    order = only(flow.roots)
    b = only(order.children)
    assert (b.id, b.publisher, b.published, b.topic) == ("b", None, None, "b.q")
    assert b.cause_recorded
    assert flow.orphans == []


def test_a_child_is_put_under_the_handling_that_published_it() -> None:
    flow = build(
        [
            publish("a", end=1, service="shop"),
            consume("a", end=3, service="billing", group="billing", span_id="00000000000000b1"),
            consume("a", end=3, service="mail", group="mail", span_id="00000000000000b2"),
            publish("b", end=2, service="mail", cause="a", parent="00000000000000b2"),
            # c's publish span lost its parent link: the one mail handling running is its cause.
            publish("c", end=3, service="mail", cause="a"),
        ]
    )
    order = only(flow.roots)
    assert handling(order, "billing").children == []
    assert [c.id for c in handling(order, "mail").children] == ["b", "c"]
    assert order.children == []


def test_a_saga_steps_messages_hang_under_the_handling_that_started_the_saga() -> None:
    """A step runs after its handler ended, in a span of its own under the handler's:
    its messages are found through that span (the context) and named by the step."""
    step = SpanRecord(
        trace_id="ab" * 16,
        span_id="00000000000000c1",
        parent_id="00000000000000b1",
        name="saga fulfilment reserve",
        kind="INTERNAL",
        service="orders",
        start_ns=BASE + 10 * MS,
        end_ns=BASE + 12 * MS,
        status="UNSET",
        status_message=None,
        attributes={"wirework.saga": "fulfilment", "wirework.step": "reserve"},
    )
    flow = build(
        [
            publish("a", end=1, service="shop"),
            consume("a", end=3, service="orders", group="fulfilment", span_id="00000000000000b1"),
            consume("a", end=3, service="mail", group="mail"),
            publish("b", end=11, service="orders", cause="a", parent="00000000000000c1"),
            consume("b", end=12, service="inventory"),
        ],
        context=[step],
    )
    order = only(flow.roots)
    b = only(handling(order, "orders").children)
    assert (b.id, b.via) == ("b", "saga fulfilment · reserve")
    assert "from orders (saga fulfilment · reserve)" in line(drawn(flow), "Typeb")
    assert order.children == []


def test_attempts_collapse_into_one_handling_even_with_some_missing() -> None:
    flow = build(
        [
            publish("a", end=1),
            # Attempts 1 and 2 were not recorded; the third failed and gave up.
            consume(
                "a",
                end=9,
                attempt=3,
                outcome="error",
                error="RuntimeError: down",
                wirework__dead_lettered=True,
            ),
        ]
    )
    one = only(only(flow.roots).handlings)
    assert (one.attempts, one.outcome, one.error) == (3, "dead_lettered", "RuntimeError: down")
    assert flow.status == "failed"


@pytest.mark.parametrize(
    ("outcome", "dead_lettered", "expected", "status"),
    [
        ("error", False, "retrying", "pending"),
        ("retry", False, "retrying", "pending"),
        ("rejected", True, "rejected", "failed"),
        ("error_reply", False, "error_reply", "failed"),
        ("cancelled", False, "cancelled", "pending"),
    ],
)
def test_outcomes_and_the_flow_status(
    outcome: str, dead_lettered: bool, expected: str, status: str
) -> None:
    extra: dict[str, Any] = {"wirework__dead_lettered": True} if dead_lettered else {}
    flow = build([publish("a", end=1), consume("a", end=2, outcome=outcome, error="boom", **extra)])
    assert only(only(flow.roots).handlings).outcome == expected
    assert flow.status == status


def test_an_error_reply_is_the_responders_failure_not_a_failed_publish() -> None:
    flow = build(
        [
            publish("q", end=1, service="billing", wirework__request=True),
            consume(
                "q",
                end=3,
                service="inventory",
                outcome="error_reply",
                error="replied with an error",
                span_id="00000000000000c1",
            ),
            publish(
                "r",
                end=2,
                service="inventory",
                cause="q",
                parent="00000000000000c1",
                error="error reply",
                cloudevents__event_type=ERROR_EVENT_TYPE,
                messaging__destination__temporary=True,
            ),
        ]
    )
    request = only(flow.roots)
    responder = only(request.handlings)
    assert responder.outcome == "error_reply"
    reply = only(responder.children)
    assert (reply.reply, reply.publish_error, reply.type) == (True, None, ERROR_EVENT_TYPE)
    assert flow.status == "failed"
    assert "answered with an error" in line(drawn(flow), "✗ inventory")


def test_a_server_span_above_the_root_publish_is_its_trigger() -> None:
    gateway = SpanRecord(
        trace_id="ab" * 16,
        span_id="00000000000000f1",
        parent_id=None,
        name="POST /orders",
        kind="SERVER",
        service="gateway",
        start_ns=BASE,
        end_ns=BASE + 10 * MS,
        status="UNSET",
    )
    orders = gateway.model_copy(
        update={
            "span_id": "00000000000000f2",
            "parent_id": "00000000000000f1",
            "name": "POST /v1/orders",
            "service": "orders",
            "start_ns": BASE + MS // 10,
        }
    )
    work = gateway.model_copy(
        update={
            "span_id": "00000000000000f3",
            "parent_id": "00000000000000f2",
            "name": "place order",
            "kind": "INTERNAL",
            "service": "orders",
        }
    )
    root = publish("a", end=1, service="orders", parent="00000000000000f3")
    flow = build([root, consume("a", end=2)], context=[gateway, orders, work])
    trigger = only(flow.roots).trigger
    assert trigger is not None
    assert (trigger.service, trigger.name) == ("orders", "POST /v1/orders")
    # The flow starts with its trigger (the gateway's call above it is not part of it).
    assert trigger.start == 0
    assert flow.duration == pytest.approx(0.0099)


def test_load_flow_reads_the_store_and_finds_the_trigger(store_path: Path) -> None:
    root = publish("a", end=1, parent="00000000000000f1")
    call = SpanRecord(
        trace_id=root.trace_id,
        span_id="00000000000000f1",
        parent_id=None,
        name="POST /v1/orders",
        kind="SERVER",
        service="orders",
        start_ns=BASE,
        end_ns=BASE + 5 * MS,
        status="ERROR",
        status_message="HTTP 500",
    )
    write(store_path, [call, root, consume("a", end=2, service="billing")])
    store = SpanStore(store_path, create=False)
    flow = load_flow(store, CORRELATION)
    assert flow is not None
    trigger = only(flow.roots).trigger
    assert trigger is not None
    assert trigger.error == "HTTP 500"
    assert flow.status == "failed"
    assert load_flow(store, "unknown") is None
    assert store.resolve_correlation(CORRELATION[:8]) == [CORRELATION]
    assert store.resolve_correlation(CORRELATION[:7]) == []
    assert store.recent_correlations(5) == [CORRELATION]
    store.close()
