"""What every benchmark sends and how its consumers are set up, shared with the workers."""

from __future__ import annotations

from pydantic import BaseModel

from wirework.brokers.base import Subscription
from wirework.envelope import Envelope, WireMessage, encode_binary

TOPIC = "bench.orders"
GROUP = "bench-workers"
EVENT_TYPE = "bench.order_placed"

#: Handlers one Consumer runs at once, and the deliveries its subscription may hold.
CONCURRENCY = 8
PREFETCH = 32

#: Publishes one producer keeps in flight (``bench.sqlite_e2e.windowed``: as many lanes).
PUBLISH_WINDOW = 100
#: Publisher tasks in the concurrent-publishers workload, each awaiting every publish.
PUBLISHERS = 8

SUBSCRIPTION = Subscription(topic=TOPIC, group=GROUP, prefetch=PREFETCH)


class Order(BaseModel):
    payload: str


def make_messages(count: int) -> list[WireMessage]:
    """``count`` distinct CloudEvents in binary mode, about 1 KiB each on the wire."""
    return [
        encode_binary(Envelope.new(EVENT_TYPE, Order(payload="x" * 900), source="/bench"))
        for _ in range(count)
    ]
