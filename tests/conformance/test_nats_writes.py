"""The NATS backend's socket writes: where acks go, and headers parsed as nats-py parses them.

A plain ack goes with the connection's next publish or request, or alone after
``ACK_DELAY``, never behind a direct reply (nats-server handles it before it
flushes the reply, which holds the reply back). These checks run on the shared
server (``-k nats`` selects them with the conformance suite) and say what each
one proves in its first line.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client
from pydantic import BaseModel

from tests.helpers.services import require_service
from wirework.brokers.base import Subscription
from wirework.brokers.nats import NatsBroker, NatsSettings, purge_namespace
from wirework.brokers.nats_client import ACK_DELAY, parse_header_lines
from wirework.brokers.nats_delivery import NatsDelivery
from wirework.envelope import Envelope, encode_binary
from wirework.testing.conformance import wait_until

pytestmark = pytest.mark.ext


class Note(BaseModel):
    n: int


URL = "nats://127.0.0.1:4222"
TOPIC = "writes"
GROUP = "g"


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    require_service("NATS", "127.0.0.1", 4222)
    namespace = f"wwtest-{uuid.uuid4().hex[:12]}"
    opened = NatsBroker(URL, settings=NatsSettings(namespace=namespace))
    try:
        yield opened
    finally:
        await opened.aclose()
        await purge_namespace(URL, namespace)


SUBSCRIPTION = Subscription(topic=TOPIC, group=GROUP, lease_timeout=30.0)


@pytest.fixture
async def delivery(broker: NatsBroker) -> AsyncIterator[NatsDelivery]:
    """The one message of a fresh group, delivered and not settled."""
    await broker.declare_group(SUBSCRIPTION)
    message = encode_binary(Envelope.new("t.happened", Note(n=1), source="/test"))
    await broker.publish(TOPIC, message)
    deliveries: AsyncGenerator[NatsDelivery, None] = broker.subscribe(SUBSCRIPTION)
    try:
        yield await anext(deliveries)
    finally:
        await deliveries.aclose()


async def all_acked(broker: NatsBroker) -> bool:
    """The server holds no message of the group that is not acked."""
    group = await broker.topology.join(SUBSCRIPTION)
    info = await broker.connection.api(
        f"CONSUMER.INFO.{group.stream}.{group.consumer}", None, what="reading the group"
    )
    return int(info["num_ack_pending"]) + int(info["num_pending"]) == 0


async def test_queued_acks_go_with_the_next_publish(
    broker: NatsBroker, delivery: NatsDelivery
) -> None:
    """A queued ack is handed to nats-py with the next publish, before it: one write for both."""
    other = f"{TOPIC}.other"
    await broker.declare_group(Subscription(topic=other, group=GROUP))  # publish sends at once
    await delivery.ack()
    connection = broker.connection
    assert connection._acks, "the ack was queued"
    message = encode_binary(Envelope.new("t.happened", Note(n=2), source="/test"))
    await broker.publish(other, message)
    assert connection._acks == []
    assert connection._ack_timer is None
    await wait_until(lambda: all_acked(broker), timeout=5.0)


async def test_an_ack_with_nothing_due_is_written_within_the_ack_delay(
    broker: NatsBroker, delivery: NatsDelivery
) -> None:
    """With nothing to share a write with, the ack waits at most ACK_DELAY, then goes alone."""
    nc = await broker.connection.client()
    await nc.flush()  # nothing left unwritten
    await delivery.ack()
    assert broker.connection._ack_timer is not None
    await wait_until(lambda: all_acked(broker), timeout=5.0 + ACK_DELAY)


async def test_a_direct_reply_leaves_queued_acks_queued(
    broker: NatsBroker, delivery: NatsDelivery
) -> None:
    """A reply to a caller's inbox is written without the queued acks, which follow on their own."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("test")
    try:
        await delivery.ack()
        connection = broker.connection
        reply = encode_binary(Envelope.new("t.answer", Note(n=1), source="/test"))
        await replies.send_reply(inbox.address, reply)
        assert connection._acks, "the ack did not ride on the reply"
        nc = await connection.client()
        assert all(b"+ACK" not in command for command in nc._pending)
        answered = await anext(aiter(inbox))
        assert answered.body == reply.body
        await wait_until(lambda: all_acked(broker), timeout=5.0 + ACK_DELAY)
    finally:
        await inbox.aclose()


async def test_a_direct_reply_is_written_before_send_reply_returns(broker: NatsBroker) -> None:
    """A reply goes to the socket in ``send_reply`` itself, not on the flusher's next turn:
    nothing of it is left pending for whatever the responder does next."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("test")
    try:
        nc = await broker.connection.client()
        reply = encode_binary(Envelope.new("t.answer", Note(n=1), source="/test"))
        await replies.send_reply(inbox.address, reply)
        assert nc._pending == []
        assert nc._pending_data_size == 0
        answered = await anext(aiter(inbox))
        assert answered.body == reply.body
    finally:
        await inbox.aclose()


_HEADER_BYTES = st.binary(max_size=40) | st.sampled_from(
    [b"ce-id", b" a b ", b"x\x1cy", b"\x1fz", b"name\t", b"caf\xc3\xa9", b"", b":", b"\r"]
)


@given(
    st.lists(
        st.tuples(_HEADER_BYTES, st.sampled_from([b":", b": ", b"", b":\t"]), _HEADER_BYTES),
        max_size=8,
    )
)
def test_header_lines_parse_as_nats_py_parses_them(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    """The faster header parser gives nats-py's own result, byte for byte, for any block."""
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines) + b"\r\n\r\n"
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_a_wirework_header_block_parses_as_nats_py_parses_it() -> None:
    """A real CloudEvent's header block (what every delivery carries) parses the same."""
    message = encode_binary(Envelope.new("t.happened", Note(n=1), source="/a b/ü"))
    raw = b"".join(f"{k}: {v}\r\n".encode() for k, v in message.headers.items()) + b"\r\n"
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)
    assert len(parse_header_lines(raw)) == len(message.headers)
