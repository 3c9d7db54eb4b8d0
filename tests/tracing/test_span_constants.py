"""The messaging spans' constant attributes are worked out once per topic, and still
follow the service when it is pointed at another broker."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tests.tracing.conftest import TracingFactory
from wirework.brokers import connect
from wirework.service import Service
from wirework.tracing import SpanRecord, SpanStore, instrument


class Ping(BaseModel):
    n: int


async def test_messaging_system_follows_the_broker_the_service_uses_now(
    tracing_for: TracingFactory, store_path: Path, tmp_path: Path
) -> None:
    shop = Service("shop", broker=connect("memory://"))
    tracing = tracing_for("shop")
    instrument(shop, provider=tracing.provider)
    async with shop:
        await shop.publish("pings", Ping(n=1))
        await shop.publish("pings", Ping(n=2))
    await shop.broker.aclose()
    shop.use_broker(f"sqlite:///{tmp_path}/broker.db?durability=fast")
    async with shop:
        await shop.publish("pings", Ping(n=3))
    assert tracing.force_flush()
    store = SpanStore(store_path, create=False)
    spans: list[SpanRecord] = [s for t in store.recent() for s in store.spans(t.trace_id)]
    systems = sorted(str(s.attributes["messaging.system"]) for s in spans)
    assert systems == ["memory", "memory", "sqlite"]
    assert {s.name for s in spans} == {"pings publish"}
    assert {s.attributes["messaging.destination.name"] for s in spans} == {"pings"}
