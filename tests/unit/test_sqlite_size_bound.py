"""A SQLite delivery answers "over the limit?" from its stored bytes, and counts only near it.

``SqliteDelivery.exceeds`` takes the stored headers' JSON plus the body as an
upper bound of ``WireMessage.size`` and counts exactly only when that bound is
over the limit. These hold it to the exact count for headers whose JSON differs
most from their text (escapes, non-ASCII, surrogate pairs), at every limit
around the size and around the bound, on messages stored and claimed for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wirework.brokers import Subscription
from wirework.brokers.sqlite import SqliteBroker, SqliteDelivery
from wirework.envelope import WireMessage

HEADERS = {
    "ascii": {"ce-id": "a1", "ce-type": "t"},
    "escapes": {"ce-id": 'q"\\\n\t\x01', "x-note": "\x7f"},
    "non-ascii": {"ce-id": "é", "ce-subject": "naïve ✓"},
    "emoji": {"ce-id": "😀", "x-face": "🙂🙃"},
    "none": {},
}


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    async with SqliteBroker(tmp_path / "b.db") as opened:
        yield opened


async def delivered(broker: SqliteBroker, message: WireMessage) -> SqliteDelivery:
    subscription = Subscription(topic="sizes", group="g", start="earliest")
    deliveries = broker.subscribe(subscription)
    await broker.publish("sizes", message)
    delivery = await asyncio.wait_for(anext(deliveries), timeout=5.0)
    await delivery.ack()
    await deliveries.aclose()
    assert isinstance(delivery, SqliteDelivery)
    return delivery


@pytest.mark.parametrize("name", list(HEADERS))
async def test_the_bound_answers_as_the_exact_count_at_every_limit(
    broker: SqliteBroker, name: str
) -> None:
    message = WireMessage(headers=HEADERS[name], body='{"n": "ü"}'.encode())
    delivery = await delivered(broker, message)
    assert delivery.message == message
    size = message.size
    bound = delivery._size_bound
    assert bound >= size  # what the shortcut stands on
    for limit in {0, size - 1, size, size + 1, bound - 1, bound, bound + 1}:
        if limit >= 0:
            assert delivery.exceeds(limit) is (size > limit), (name, limit, size, bound)


async def test_a_message_within_its_bound_is_not_counted(broker: SqliteBroker) -> None:
    delivery = await delivered(broker, WireMessage(headers={"ce-id": "x"}, body=b"{}"))
    counted = 0

    class Counting(WireMessage):
        @property
        def size(self) -> int:
            nonlocal counted
            counted += 1
            return super().size

    delivery.message = Counting(delivery.message.headers, delivery.message.body)
    assert not delivery.exceeds(delivery._size_bound)
    assert counted == 0
    assert not delivery.exceeds(delivery._size_bound - 1)  # over the bound: counted
    assert counted == 1


async def test_headers_stored_as_text_by_another_writer_still_bound_the_size(
    broker: SqliteBroker,
) -> None:
    """Text counts characters, not UTF-8 bytes: 100 'é' are 106 characters of JSON, 200 bytes."""
    message = WireMessage(headers={"ce-id": "é" * 100}, body=b"{}")
    subscription = Subscription(topic="sizes", group="g", start="earliest")
    await broker.declare_group(subscription)
    await broker.publish("sizes", message)
    with contextlib.closing(sqlite3.connect(broker.path)) as other_writer, other_writer:
        other_writer.execute("UPDATE ww_messages SET headers = CAST(headers AS TEXT)")
    deliveries = broker.subscribe(subscription)
    delivery = await asyncio.wait_for(anext(deliveries), timeout=5.0)
    await delivery.ack()
    await deliveries.aclose()
    assert isinstance(delivery, SqliteDelivery)
    assert delivery.message == message
    size = message.size
    for limit in range(size - 120, size + 2):
        assert delivery.exceeds(limit) is (size > limit), (limit, size)
