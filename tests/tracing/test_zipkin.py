"""Zipkin as an option: ``OTEL_TRACES_EXPORTER=zipkin`` sends spans as Zipkin v2 JSON to
``OTEL_EXPORTER_ZIPKIN_ENDPOINT``, received here by a real in-process HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel

from wirework.brokers import connect
from wirework.service import Service
from wirework.testing.conformance import wait_until
from wirework.tracing import Tracing, configure_tracing, instrument


class OrderPlaced(BaseModel):
    order_id: str


@pytest.fixture
async def zipkin() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A Zipkin collector's ``POST /api/v2/spans``: keeps every span it is sent."""
    received: list[dict[str, Any]] = []

    async def spans(request: web.Request) -> web.Response:
        received.extend(json.loads(await request.read()))
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/api/v2/spans", spans)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/api/v2/spans", received
    await runner.cleanup()


async def test_spans_reach_zipkin_when_the_environment_names_it(
    built: list[Tracing],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    zipkin: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = zipkin
    monkeypatch.chdir(tmp_path)
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "WIREWORK_SPAN_STORE", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", url)
    tracing = configure_tracing("orders-zipkin", set_global=False, schedule_delay=0.05)
    built.append(tracing)
    assert list(tracing.processors) == ["zipkin"]
    broker = connect("memory://")
    orders = Service("orders", broker=broker)
    seen: list[str] = []

    @orders.subscribe("orders")
    async def placed(event: OrderPlaced) -> None:
        seen.append(event.order_id)

    instrument(orders, provider=tracing.provider)
    async with orders:
        await orders.publish("orders", OrderPlaced(order_id="o-1"))
        await wait_until(lambda: seen == ["o-1"], what="the event handled")

    async def exported() -> bool:
        await asyncio.to_thread(tracing.force_flush, 5.0)  # its POST needs this loop
        return sorted(span["name"] for span in received) == ["orders process", "orders publish"]

    await wait_until(exported, what="both spans at the Zipkin endpoint")
    await broker.aclose()
    spans = {span["name"]: span for span in received}
    publish, process = spans["orders publish"], spans["orders process"]
    assert publish["traceId"] == process["traceId"]
    assert process["parentId"] == publish["id"]
    assert (publish["kind"], process["kind"]) == ("PRODUCER", "CONSUMER")
    assert publish["localEndpoint"]["serviceName"] == "orders-zipkin"
