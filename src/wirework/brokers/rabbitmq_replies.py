"""Direct replies on RabbitMQ: direct reply-to (``amq.rabbitmq.reply-to``).

On the topic contract a reply is a confirmed, persistent publish into the
caller's reply exchange and quorum queue, consumed with a lease and acked. A
reply needs none of it (its caller waits against a deadline and drops late or
duplicate replies), so each caller instance consumes RabbitMQ's direct
reply-to pseudo-queue, with no-ack, on a channel of its own, as the RabbitMQ
documentation prescribes: no queue is declared, nothing is stored, and a reply
is one unconfirmed publish to the default exchange.

RabbitMQ names a caller's reply address only when a message published on the
consuming channel carries ``reply_to = amq.rabbitmq.reply-to``; the request
itself goes out through the broker's confirming channel (the durable publish
of the contract), so the inbox learns its address once, when it opens, from a
probe message sent to a private exclusive queue on its own channel and read
back (four round trips, once per inbox).

The address lives as long as the channel: when the connection drops, it is
gone for good, and replies sent to it are silently dropped by RabbitMQ. The
inbox then reports the old address to ``on_lost`` (the requester fails the
requests waiting on it at once with ``ReplyLostError`` rather than letting
them run into their deadline), and opens a new channel and address as soon as
the connection is back. ``aclose`` closes the channel: the server keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage

from wirework.brokers.rabbitmq_link import amqp_errors, log, redact
from wirework.brokers.rabbitmq_names import split_headers
from wirework.envelope import WireMessage
from wirework.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:
    from wirework.brokers.rabbitmq import RabbitBroker

#: Scheme of an inbox address: ``amqp-reply:amq.rabbitmq.reply-to.<id>``; a topic name
#: never holds a colon.
SCHEME = "amqp-reply:"

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: Tries to read back the probe that names the inbox's address (each one round trip).
_PROBE_TRIES = 50

_ROUTING_KEY = re.compile(r"^amq\.rabbitmq\.reply-to\.[A-Za-z0-9+/=._-]{1,220}$")

_END = object()


def _routing_key(address: str) -> str | None:
    if not address.startswith(SCHEME):
        return None
    key = address[len(SCHEME) :]
    # Only a direct reply-to name: a responder must never publish into a real queue.
    return key if _ROUTING_KEY.fullmatch(key) else None


class RabbitReplies:
    """The direct reply path of one ``RabbitBroker`` (``broker.direct_replies()``).

    Replies go out on a channel of their own, so that RabbitMQ closing it over a
    bad address never touches the channels the contract uses.
    """

    def __init__(self, broker: RabbitBroker) -> None:
        self._broker = broker
        self._channel: AbstractChannel | None = None
        self._opening = asyncio.Lock()

    async def open_reply_inbox(
        self, owner: str, *, on_lost: Callable[[str], None] | None = None
    ) -> RabbitInbox:
        """Consume direct reply-to on a new channel and learn its address.

        ``owner`` names nothing on the server (direct reply-to has no queue).
        """
        self._broker._check_open()
        inbox = RabbitInbox(self._broker, on_lost)
        await inbox.attach(wait=False)
        return inbox

    def is_direct_address(self, replyto: str) -> bool:
        return _routing_key(replyto) is not None

    async def send_reply(self, replyto: str, message: WireMessage) -> None:
        """One unconfirmed publish to the default exchange, as direct reply-to expects."""
        routing_key = _routing_key(replyto)
        if routing_key is None:
            raise ConfigurationError(
                f"{replyto!r} is not a RabbitMQ reply inbox address "
                f"({SCHEME}{DIRECT_REPLY_TO}.<id>)"
            )
        broker = self._broker
        broker._check_open()
        broker.check_size(replyto, message)
        channel = await self._reply_channel()
        properties = spec.Basic.Properties(headers=dict(message.headers))
        with amqp_errors(f"replying to {replyto!r}", broker.link.url):
            # Shielded: a publish cancelled between its frames would close the channel.
            await broker.shielded(
                channel.basic_publish(
                    message.body, exchange="", routing_key=routing_key, properties=properties
                )
            )

    async def _reply_channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._opening:
            channel = self._channel
            if channel is None or channel.is_closed:
                link = self._broker.link
                connection = await link.connected(wait=False, timeout=None)
                with amqp_errors("opening the reply channel", link.url):
                    channel = await self._broker.shielded(
                        connection.channel(publisher_confirms=False)
                    )
                self._channel = channel
            return channel


class RabbitInbox:
    """One caller instance's direct reply-to consumer, re-attached after a connection loss."""

    def __init__(self, broker: RabbitBroker, on_lost: Callable[[str], None] | None) -> None:
        self.address = ""
        self.channel: AbstractChannel | None = None
        """The channel consuming direct reply-to now (None once closed)."""
        self._broker = broker
        self._on_lost = on_lost
        self._queue: asyncio.Queue[DeliveredMessage | AbstractChannel | object] = asyncio.Queue()
        self._closed = False
        self._reading = False

    async def attach(self, *, wait: bool) -> None:
        """Open a channel, consume direct reply-to on it, and learn its address.

        Raises:
            BrokerUnavailableError: no connection (now, or ever with ``wait``).
            BrokerClosedError: the broker was closed.
        """
        link = self._broker.link
        connection = await link.connected(wait=wait, timeout=None)
        with amqp_errors("opening a reply inbox", link.url):
            channel = await self._broker.shielded(connection.channel(publisher_confirms=False))
        try:
            with amqp_errors("opening a reply inbox", link.url):
                address = await self._broker.shielded(self._consume(channel))
        except BaseException:
            await link.close_channel(channel)
            raise
        self.channel = channel
        self.address = SCHEME + address
        # Fires when the channel or its connection closes, whoever closes it.
        channel.closing.add_done_callback(lambda _: self._queue.put_nowait(channel))

    async def _consume(self, channel: AbstractChannel) -> str:
        await channel.basic_consume(DIRECT_REPLY_TO, self._received, no_ack=True)
        declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
        probe = declared.queue or ""
        try:
            await channel.basic_publish(
                b"",
                exchange="",
                routing_key=probe,
                properties=spec.Basic.Properties(reply_to=DIRECT_REPLY_TO),
            )
            for _ in range(_PROBE_TRIES):
                got = await channel.basic_get(probe, no_ack=True)
                if isinstance(got.delivery, spec.Basic.GetOk):
                    address = got.header.properties.reply_to or ""
                    if _ROUTING_KEY.fullmatch(address):
                        return address
                    break
                await asyncio.sleep(0.01)
        finally:
            await channel.queue_delete(probe)
        raise BrokerError(
            f"RabbitMQ at {redact(self._broker.link.url)} did not name a direct "
            f"reply-to address; is {DIRECT_REPLY_TO} supported (RabbitMQ 3.4 or later)?"
        )

    async def _received(self, message: DeliveredMessage) -> None:
        self._queue.put_nowait(message)

    def __aiter__(self) -> AsyncIterator[WireMessage]:
        if self._reading:
            raise BrokerError(f"reply inbox {self.address!r} is already being read")
        self._reading = True
        return self._replies()

    async def _replies(self) -> AsyncIterator[WireMessage]:
        while not self._closed:
            item = await self._queue.get()
            if isinstance(item, DeliveredMessage):
                headers, _, _ = split_headers(item.header.properties.headers)
                yield WireMessage(headers=headers.headers, body=item.body)
            elif item is _END:
                return
            elif item is self.channel and not self._closed:
                await self._reattach()

    async def _reattach(self) -> None:
        """The channel is gone, and its address with it: report it, then get a new one."""
        lost = self.address
        log.warning("reply inbox %s lost with its channel; opening a new one", lost)
        if self._on_lost is not None:
            self._on_lost(lost)
        pause = self._broker.settings.reconnect_initial_backoff
        while not self._closed and not self._broker.closed:
            try:
                await self.attach(wait=True)
                return
            except BrokerError as exc:  # down again, or closed meanwhile (the loop ends)
                log.debug("reply inbox not re-opened yet: %s", exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._broker.settings.reconnect_max_backoff)

    async def aclose(self) -> None:
        """Close the channel (its consumer goes with it); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(_END)
        channel, self.channel = self.channel, None
        if channel is not None:
            with contextlib.suppress(BrokerError):
                await self._broker.link.close_channel(channel)
