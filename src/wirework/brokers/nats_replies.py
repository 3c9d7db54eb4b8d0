"""Direct replies on NATS: a core subscription on the caller's own inbox subject.

On the topic contract a reply is a JetStream publish (a PubAck round trip) to
the caller's reply stream, pulled by a durable consumer and acked. A reply
needs none of it: its caller waits against a deadline and drops late or
duplicate replies. So each caller instance subscribes (core NATS) to one
subject of its own, ``_INBOX.<nuid>``, and a reply is one core publish to it,
what ``nc.request``/``msg.respond`` do: nothing is stored, nothing to ack.

Core NATS is at most once: a reply published while the caller is
disconnected is lost, and that request ends in ``RequestTimeoutError``. The
subscription itself survives a lost connection (nats-py subscribes again on
reconnect, under the same subject), so later replies arrive as before and the
address never changes. ``aclose`` unsubscribes: the server keeps nothing.

The request itself stays a JetStream publish that waits for its PubAck. A core
publish to the same subject would still be stored by the stream, and measured
about a tenth off the round trip's p50 (interleaved runs on the development
machine: 2.8x the raw core round trip instead of 3.1x), but a request the
server refused or never got would then look like a slow one (a timeout at the
deadline instead of an error at once), for a gain that does not close the gap:
what remains is the responder's JetStream pull, which core request-reply skips.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wirework.brokers.nats_wire import BLOCK_FRAME, decode_headers, header_block
from wirework.envelope import WireMessage
from wirework.errors import BrokerError, ConfigurationError, MessageTooLargeError

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsBroker

#: Scheme of an inbox address: ``nats-reply:_INBOX.<nuid>``; a topic name never holds a colon.
SCHEME = "nats-reply:"

#: Replies buffered in the client before the server's slow-consumer rule applies.
PENDING_REPLIES = 65_536

_SUBJECT = re.compile(r"^_INBOX\.[A-Za-z0-9]{1,64}$")

_END = object()


def _subject(address: str) -> str | None:
    if not address.startswith(SCHEME):
        return None
    subject = address[len(SCHEME) :]
    # Only an inbox subject: a responder must never publish where a stream captures it.
    return subject if _SUBJECT.fullmatch(subject) else None


class NatsReplies:
    """The direct reply path of one ``NatsBroker`` (``broker.direct_replies()``)."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def open_reply_inbox(
        self, owner: str, *, on_lost: Callable[[str], None] | None = None
    ) -> NatsInbox:
        """Subscribe to a new inbox subject; returns once the server has the subscription.

        ``owner`` is not part of the subject (NATS inboxes are random); ``on_lost`` is
        never called: the subject outlives connection losses.
        """
        self._broker.check_open()
        connection = self._broker.connection
        client = await connection.client()
        inbox = NatsInbox(self._broker, client.new_inbox())
        with connection.translate(f"opening reply inbox {inbox.address!r}"):
            inbox.subscription = await client.subscribe(
                inbox.subject,
                cb=inbox.received,
                pending_msgs_limit=PENDING_REPLIES,
                pending_bytes_limit=PENDING_REPLIES * 1024,
            )
            await client.flush(timeout=self._broker.settings.api_timeout)  # type: ignore[arg-type]
        return inbox

    def is_direct_address(self, replyto: str) -> bool:
        return _subject(replyto) is not None

    async def send_reply(self, replyto: str, message: WireMessage) -> None:
        """One core publish to the caller's inbox subject; fails at once while disconnected."""
        subject = _subject(replyto)
        if subject is None:
            raise ConfigurationError(
                f"{replyto!r} is not a NATS reply inbox address ({SCHEME}_INBOX.<id>)"
            )
        broker = self._broker
        broker.check_open()
        broker.check_size(replyto, message)
        # Built once here, as a publish's is: with nats-py checking and encoding every
        # header again, a reply cost 70 us of CPU against 32-56 us (the development machine).
        block = header_block(message, {})
        connection = broker.connection
        client = await connection.client()
        size = len(message.body) + len(block) - BLOCK_FRAME  # as header_bytes counts
        if size > client.max_payload:
            raise MessageTooLargeError(size, client.max_payload, topic=replyto)
        # Queued acks are not handed over here, and those queued right after wait: with
        # (or right behind) a reply, they hold it back (nats_client's module docstring).
        with connection.translate(f"replying to {replyto!r}"):
            await connection.reply(subject, block, message.body)


class NatsInbox:
    """One caller instance's inbox subject and its subscription."""

    def __init__(self, broker: NatsBroker, subject: str) -> None:
        self.subject = subject
        self.address = SCHEME + subject
        self.subscription: Subscription | None = None
        self._broker = broker
        self._queue: asyncio.Queue[Msg | object] = asyncio.Queue()
        self._closed = False
        self._reading = False

    async def received(self, msg: Msg) -> None:
        """nats-py's callback, one message at a time: hand it to the reader."""
        self._queue.put_nowait(msg)

    def __aiter__(self) -> AsyncIterator[WireMessage]:
        if self._reading:
            raise BrokerError(f"reply inbox {self.address!r} is already being read")
        self._reading = True
        return self._replies()

    async def _replies(self) -> AsyncIterator[WireMessage]:
        while not self._closed:
            msg = await self._queue.get()
            if not isinstance(msg, Msg):
                return
            own, _ = decode_headers(msg.headers)
            yield WireMessage(headers=own, body=msg.data)

    async def aclose(self) -> None:
        """Unsubscribe (the server forgets the subject); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(_END)
        subscription, self.subscription = self.subscription, None
        if subscription is None:
            return
        connection = self._broker.connection
        with connection.translate(f"closing reply inbox {self.address!r}"):
            # While disconnected, nats-py only forgets it locally; the server has dropped
            # the connection's subscriptions already, and none is renewed on reconnect.
            await subscription.unsubscribe()
            if connection.up:
                client = await connection.client()
                await client.flush(timeout=self._broker.settings.api_timeout)  # type: ignore[arg-type]
