"""A message whose headers are not text (another writer's) is dead-lettered, and stops nothing.

Brokers that keep headers as JSON (SQLite, Redis) hand back whatever another
writer stored there: a number where a CloudEvents attribute should be a string.
Reading such a header used to raise ``TypeError`` out of ``decode_wire``, which
the consumer does not catch: the poison ended the consumer. Here the row's
headers are rewritten in the file itself, as another program would leave them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from wirework.brokers import Subscription
from wirework.brokers.base import DeadLetterReason
from wirework.brokers.sqlite import SqliteBroker
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage, decode_wire, encode_binary
from wirework.errors import DeserializationError
from wirework.testing.conformance import wait_until

GOOD: dict[Any, Any] = {"ce-id": "a", "ce-source": "/s", "ce-type": "t", "ce-specversion": "1.0"}


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({**GOOD, "ce-id": 5}, "'ce-id' holds int 5"),
        ({**GOOD, "Ce-Subject": None}, "'Ce-Subject' holds NoneType"),
        ({**GOOD, "ce-tenant": b"x"}, "'ce-tenant' holds bytes"),
        ({**GOOD, "content-type": 7}, "'content-type' holds int 7"),
        ({**GOOD, 1: "a"}, "header name 1 is int"),
    ],
    ids=["attribute", "any-case", "extension", "content-type", "name"],
)
def test_a_header_that_is_not_text_is_a_deserialization_error_naming_it(
    headers: dict[Any, Any], named: str
) -> None:
    with pytest.raises(DeserializationError, match=named):
        decode_wire(WireMessage(headers, b"{}"))


def test_a_header_decode_wire_does_not_read_may_be_anything() -> None:
    """Tolerant reading: only ce-* and content-type must be text."""
    headers: dict[Any, Any] = {**GOOD, "x-retries": 3}
    envelope = decode_wire(WireMessage(headers, b"{}"))
    assert envelope.id == "a"


class Item(BaseModel):
    n: int


async def test_a_consumer_dead_letters_a_stored_message_with_a_number_for_its_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    subscription = Subscription(topic="items", group="g", start="earliest")
    seen: list[int] = []

    async def handle(item: Item, envelope: Envelope) -> None:
        seen.append(item.n)

    async with SqliteBroker(path) as broker:
        await broker.declare_group(subscription)
        for n in (1, 2):
            await broker.publish(
                "items", encode_binary(Envelope.new("Item", Item(n=n), source="/t"))
            )
        with contextlib.closing(sqlite3.connect(path)) as other_writer, other_writer:
            (seq, stored) = other_writer.execute(
                "SELECT seq, headers FROM ww_messages ORDER BY seq LIMIT 1"
            ).fetchone()
            foreign = {**orjson.loads(stored), "ce-id": 12345}
            other_writer.execute(
                "UPDATE ww_messages SET headers = ? WHERE seq = ?", (orjson.dumps(foreign), seq)
            )
        consumer = Consumer(broker, subscription, routes=[Route("Item", Item, handle)])
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(consumer.run())
            await wait_until(lambda: seen == [2], what="the good message handled after the bad")
            await wait_until(
                lambda: consumer.stats.dead_lettered == 1, what="the bad dead-lettered"
            )
            assert not running.done(), "the consumer ended on a poison message"
            await consumer.stop(grace=1)
        (dead,) = await broker.dead_letters(topic="items")
        assert dead.reason is DeadLetterReason.DESERIALIZATION_ERROR
        assert dead.error is not None
        assert "'ce-id' holds int 12345" in dead.error.message


@pytest.mark.parametrize(
    "headers",
    [{**GOOD, "ce-id": 5}, {**GOOD, "content-type": 7}, {**GOOD, 1: "a"}],
    ids=["id", "content-type", "name"],
)
def test_message_id_is_none_where_the_id_cannot_be_read_as_text(headers: dict[Any, Any]) -> None:
    """It names the message in logs and dead-letter records: it must not raise there."""
    assert WireMessage(headers, b"{}").message_id is None
