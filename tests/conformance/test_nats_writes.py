"""The NATS backend's socket writes: where acks go, and headers parsed as nats-py parses them.

The acks of one turn of the event loop go out in one write on the next turn,
never with a JetStream publish (nats-server handles the ack first, which holds
the PubAck back) and never with or right behind a direct reply (``ACK_DELAY``
later: the same holds for the reply). The direct replies of one turn share one
write on the next turn, too. These checks run on the shared server
(``-k nats`` selects them with the conformance suite) and say what each one
proves in its first line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client
from pydantic import BaseModel

from tests.conformance.conftest import server_target_of
from wirework.brokers.base import Subscription
from wirework.brokers.nats import NatsBroker
from wirework.brokers.nats_client import ACK_DELAY, parse_header_lines
from wirework.brokers.nats_delivery import NatsDelivery
from wirework.envelope import Envelope, encode_binary
from wirework.testing.conformance import wait_until

pytestmark = pytest.mark.ext


class Note(BaseModel):
    n: int


TOPIC = "writes"
GROUP = "g"


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    async with server_target_of("nats") as target:
        opened = await target.open()
        assert isinstance(opened, NatsBroker)
        yield opened


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


class Writes:
    """Every socket write of one nats-py client, as the bytes of each call."""

    def __init__(self, nc: Client) -> None:
        transport = nc._transport
        assert transport is not None
        self.seen: list[bytes] = []
        original = transport.writelines

        def writelines(payload: Iterable[bytes]) -> None:
            chunks = list(payload)
            self.seen.append(b"".join(chunks))
            original(chunks)

        transport.writelines = writelines  # type: ignore[method-assign]

    def with_ack(self) -> list[bytes]:
        return [write for write in self.seen if b"+ACK" in write]


async def test_a_queued_ack_never_rides_on_a_jetstream_publish(
    broker: NatsBroker, delivery: NatsDelivery
) -> None:
    """A publish right after an ack leaves it queued: written with the publish, the ack would
    be handled first and hold the PubAck back; it goes out on its own write instead."""
    other = f"{TOPIC}.other"
    await broker.declare_group(Subscription(topic=other, group=GROUP))  # publish sends at once
    writes = Writes(await broker.connection.client())
    await delivery.ack()
    assert broker.connection._acks, "the ack was queued"
    message = encode_binary(Envelope.new("t.happened", Note(n=2), source="/test"))
    await broker.publish(other, message)
    await wait_until(lambda: all_acked(broker), timeout=5.0)
    publishes = [write for write in writes.seen if b"HPUB" in write]
    assert publishes, "the publish was written"
    assert all(b"+ACK" not in write for write in publishes)
    assert len(writes.with_ack()) == 1


async def test_acks_are_written_together_on_the_next_turn(broker: NatsBroker) -> None:
    """Acks queued in one turn of the event loop go out in one write on the next turn, without
    waiting for other traffic to share it."""
    await broker.declare_group(SUBSCRIPTION)
    for n in range(3):
        message = encode_binary(Envelope.new("t.happened", Note(n=n), source="/test"))
        await broker.publish(TOPIC, message)
    deliveries: AsyncGenerator[NatsDelivery, None] = broker.subscribe(SUBSCRIPTION)
    try:
        held = [await anext(deliveries) for _ in range(3)]
        nc = await broker.connection.client()
        await nc.flush()  # nothing left unwritten
        writes = Writes(nc)
        for one in held:
            await one.ack()
        assert writes.with_ack() == [], "queued, not written in the acking turn"
        await asyncio.sleep(0)  # one turn
        assert broker.connection._acks == []
        [write] = writes.with_ack()
        assert write.count(b"+ACK") == 3
        await wait_until(lambda: all_acked(broker), timeout=5.0)
    finally:
        await deliveries.aclose()


async def test_an_ack_right_after_a_direct_reply_waits_the_ack_delay(
    broker: NatsBroker, delivery: NatsDelivery
) -> None:
    """An ack queued just after a reply was written stays queued for ACK_DELAY, so the server
    reads the reply alone, and then goes out on its own."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("test")
    try:
        writes = Writes(await broker.connection.client())
        reply = encode_binary(Envelope.new("t.answer", Note(n=1), source="/test"))
        await replies.send_reply(inbox.address, reply)
        await delivery.ack()
        await asyncio.sleep(0)  # the turn on which an ack would otherwise go
        assert broker.connection._acks, "held back behind the reply"
        assert writes.with_ack() == []
        await wait_until(lambda: all_acked(broker), timeout=5.0 + ACK_DELAY)
        assert all(b"+ACK" not in write for write in writes.seen if b"HPUB" in write)
    finally:
        await inbox.aclose()


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


async def test_the_replies_of_one_turn_share_one_write(broker: NatsBroker) -> None:
    """Replies sent in one turn of the event loop go out in one socket write on the next turn,
    not one write each: with many requests in flight, a write per reply (and the server's
    read of each) cost the responder and the server more CPU than the rest of the reply."""
    replies = broker.direct_replies()
    inbox = await replies.open_reply_inbox("test")
    try:
        nc = await broker.connection.client()
        await nc.flush()  # nothing left unwritten
        writes = Writes(nc)
        sent = [
            encode_binary(Envelope.new("t.answer", Note(n=n), source="/test")) for n in range(3)
        ]
        await asyncio.gather(*(replies.send_reply(inbox.address, reply) for reply in sent))
        await asyncio.sleep(0)  # the next turn, on which they are written
        assert nc._pending == []
        assert nc._pending_data_size == 0
        [write] = [write for write in writes.seen if inbox.subject.encode() in write]
        assert write.count(b"HPUB " + inbox.subject.encode()) == 3
        received = aiter(inbox)
        answered = [(await anext(received)).body for _ in sent]
        assert answered == [reply.body for reply in sent]
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
