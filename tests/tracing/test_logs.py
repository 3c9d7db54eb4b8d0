"""Log lines name their trace: trace id, span id and correlation id, as JSON off a terminal."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext
from pydantic import BaseModel

from wirework.brokers import connect
from wirework.service import Service
from wirework.testing.conformance import wait_until
from wirework.tracing import configure_logging, instrument


class Placed(BaseModel):
    order_id: str


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    made = TracerProvider(shutdown_on_exit=False)
    yield made
    made.shutdown()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
async def test_a_handlers_log_lines_carry_its_trace_and_correlation(
    provider: TracerProvider,
) -> None:
    stream = io.StringIO()  # not a terminal: JSON lines
    configure_logging(stream=stream)
    log = logging.getLogger("shop.orders")
    broker = connect("memory://")
    orders = Service("orders", broker=broker)
    done: list[str] = []
    contexts: list[SpanContext] = []

    @orders.subscribe("orders")
    async def placed(event: Placed) -> None:
        contexts.append(trace.get_current_span().get_span_context())
        log.info("placing %s\r\nforged: line", event.order_id, extra={"order_id": event.order_id})
        done.append(event.order_id)

    instrument(orders, provider=provider)
    async with orders:
        sent = await orders.publish("orders", Placed(order_id="o-1"))
        await wait_until(lambda: done == ["o-1"], what="handled")
    await broker.aclose()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (record,) = [line for line in lines if line["logger"] == "shop.orders"]
    assert record["message"] == "placing o-1\r\nforged: line"
    assert record["correlation_id"] == sent.correlationid
    assert record["order_id"] == "o-1"
    (handling,) = contexts
    assert handling.is_valid
    assert record["trace_id"] == f"{handling.trace_id:032x}"
    assert record["span_id"] == f"{handling.span_id:016x}"


@pytest.mark.usefixtures("restore_logging")
def test_outside_a_span_the_fields_are_empty_and_text_is_available() -> None:
    stream = io.StringIO()
    handler = configure_logging(json=False, stream=stream)
    logging.getLogger("shop").warning("plain")
    assert "[trace= span= correlation=] plain" in stream.getvalue()
    again = configure_logging(json=True, stream=stream)
    assert handler not in logging.getLogger().handlers
    assert again in logging.getLogger().handlers


@pytest.mark.usefixtures("restore_logging")
def test_exceptions_are_kept_in_the_json_line() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        raise ValueError("bad input")
    except ValueError:
        logging.getLogger("shop").exception("failed")
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["level"] == "ERROR"
    assert "ValueError: bad input" in record["exception"]
    assert "trace_id" not in record
