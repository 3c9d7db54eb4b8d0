"""The Redis reply: one plain ``XADD`` into the caller's own stream, and only while it exists;
and the caller's inbox, which lets the callers a reply woke run before it reads again.

These checks run on the shared server (``-k redis`` selects them with the conformance
suite) and say what each one proves in its first line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio

from tests.conformance.conftest import server_target_of
from wirework.brokers import redis_replies
from wirework.brokers.redis import RedisBroker
from wirework.envelope import WireMessage
from wirework.testing.conformance import wait_until

pytestmark = pytest.mark.ext


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    async with server_target_of("redis") as target:
        opened = await target.open()
        assert isinstance(opened, RedisBroker)
        yield opened


REPLY = WireMessage(headers={"ce-id": "r1", "ce-source": "/a b"}, body=b'{"n": 1}')


async def test_a_reply_lands_as_one_entry_of_headers_and_body(
    broker: RedisBroker, redis_client: redis.asyncio.Redis
) -> None:
    """A reply is one stream entry in the caller's inbox: its headers as JSON, its body as is."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("caller")
    try:
        before = await redis_client.xlen(inbox.key)
        await replies.send_reply(inbox.address, REPLY)
        entries = await redis_client.xrange(inbox.key)
        assert await redis_client.xlen(inbox.key) == before + 1
        assert entries, "the reply is in the stream"
        fields = entries[-1][1]
        assert fields is not None
        assert set(fields) == {b"h", b"b"}
        assert orjson.loads(fields[b"h"]) == dict(REPLY.headers)
        assert fields[b"b"] == REPLY.body
    finally:
        await inbox.aclose()


async def test_a_reply_to_an_inbox_that_is_gone_leaves_nothing(
    broker: RedisBroker, redis_client: redis.asyncio.Redis
) -> None:
    """A reply to a caller whose stream is gone (stopped, or expired) is dropped: it never
    creates the stream again, so nothing is left behind that nobody reads."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("caller")
    await inbox.aclose()
    assert not await redis_client.exists(inbox.key)
    await replies.send_reply(inbox.address, REPLY)
    assert not await redis_client.exists(inbox.key)


async def test_a_caller_woken_by_a_reply_runs_before_the_inbox_reads_again(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbox's next read is a socket write: the caller a reply woke runs first, so its
    answer is not held up behind that write."""
    events: list[str] = []
    real_read = redis_replies.RedisInbox._read

    async def recorded_read(self: redis_replies.RedisInbox, *args: Any) -> Any:
        events.append("read")
        return await real_read(self, *args)

    monkeypatch.setattr(redis_replies.RedisInbox, "_read", recorded_read)
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("caller")
    answered: asyncio.Future[WireMessage] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async for message in inbox:
            if not answered.done():
                answered.set_result(message)

    async def caller() -> None:
        await answered
        events.append("caller")

    reader = asyncio.create_task(read())
    waiting = asyncio.create_task(caller())
    try:
        await wait_until(lambda: events == ["read"], 5, what="the first read sent")
        await replies.send_reply(inbox.address, REPLY)
        await wait_until(lambda: len(events) >= 3, 5, what="the reply read and the next read")
        assert events[:3] == ["read", "caller", "read"]
    finally:
        reader.cancel()
        waiting.cancel()
        await asyncio.gather(reader, waiting, return_exceptions=True)
        await inbox.aclose()
