"""Direct replies on Redis: one reply stream per caller instance, read with a blocking XREAD.

The topic contract costs a reply a consumer group, a lease, a fetch script, a
wake-up over pub/sub and an ack. A reply needs none of it (its caller waits
against a deadline and drops late or duplicate replies), so here it is one
``XADD`` to the caller's own stream ``{namespace}:reply:<token>``, which the
caller reads with a blocking ``XREAD`` on a connection of its own: no group,
no ack, the same round trip a hand-written Redis RPC has.

What keeps it from growing or outliving its caller:

* the reader trims what it has read (``XTRIM MINID``, pipelined with a read
  every ``RENEW`` seconds or ``TRIM_AFTER`` replies, so a busy inbox's read is
  the one ``XREAD``), and a reply's ``XADD`` caps the stream at about
  ``MAX_UNREAD`` entries;
* the stream expires ``TTL`` after its reader last renewed it (``PEXPIRE``,
  pipelined with a read every ``RENEW`` seconds: a blocking read returns at
  least every ``BLOCK``), so a caller killed without ``aclose`` leaves it for
  at most that long;
* a reply never creates a stream (``NOMKSTREAM``): a reply to a caller that
  is gone is dropped and leaves nothing behind;
* ``aclose`` deletes the stream.

A lost connection pauses the reader, which reconnects with backoff and goes
on from the last entry it read: replies sent meanwhile wait in the stream, so
the inbox keeps its address and its pending requests. If the stream expired
during a long outage (or the server restarted without persistence), it is
created again under the same address; replies sent while it was gone are
lost, and their requests time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import hiredis
import orjson
from redis.asyncio import ConnectionPool

from wirework.brokers.redis_link import Backoff, log, translate, where
from wirework.brokers.redis_scripts import Command
from wirework.envelope import WireMessage
from wirework.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:
    from wirework.brokers.redis import RedisBroker

#: Scheme of an inbox address: ``redis-reply:<token>``; a topic name never holds a colon.
SCHEME = "redis-reply:"

#: Seconds a reply stream outlives the last renewal by its reader (at most ``RENEW`` +
#: ``BLOCK`` before it stopped reading).
TTL = 60.0

#: Longest blocking XREAD, so the reader renews the stream's expiry in time.
BLOCK = 5.0

#: Seconds between renewals of the expiry (and of the trim), well inside ``TTL``.
RENEW = 5.0

#: Replies read since the last trim that make the next read trim them, whatever the time.
TRIM_AFTER = 256

#: Replies one XREAD takes at most.
BATCH = 512

#: Entries a reply stream keeps at most (approximately); the reader trims what it read.
MAX_UNREAD = 10_000

_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

#: A reply: one XADD to the caller's stream, capped, which never creates the stream
#: (NOMKSTREAM); sent as a plain command, with no script around it.
_SEND = Command("XADD")


def _token(address: str) -> str | None:
    if not address.startswith(SCHEME):
        return None
    token = address[len(SCHEME) :]
    return token if _TOKEN.fullmatch(token) else None


class RedisReplies:
    """The direct reply path of one ``RedisBroker`` (``broker.direct_replies()``)."""

    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    async def open_reply_inbox(
        self, owner: str, *, on_lost: Callable[[str], None] | None = None
    ) -> RedisInbox:
        """Create the caller's reply stream; returns once replies can reach it.

        ``on_lost`` is never called: the address outlives connection losses.
        """
        self._broker._check_open()
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", owner)[:100]
        inbox = RedisInbox(self._broker, f"{readable}.{uuid.uuid4().hex[:16]}")
        await inbox.create()
        return inbox

    def is_direct_address(self, replyto: str) -> bool:
        return _token(replyto) is not None

    async def send_reply(self, replyto: str, message: WireMessage) -> None:
        """``XADD`` to the caller's stream if it still exists; sent once, never resent."""
        token = _token(replyto)
        if token is None:
            raise ConfigurationError(
                f"{replyto!r} is not a Redis reply inbox address ({SCHEME}<token>)"
            )
        broker = self._broker
        broker._check_open()
        broker.check_size(replyto, message)
        args: list[str | bytes | int] = [
            broker.prefix + "reply:" + token,
            "NOMKSTREAM",
            "MAXLEN",
            "~",
            MAX_UNREAD,
            "*",
            "h",
            orjson.dumps(dict(message.headers)),
            "b",
            message.body,
        ]
        await broker._link.call(
            _SEND,
            args,
            what=f"replying to {replyto!r}",
            resend=False,
            wait=False,
            timeout=broker.settings.command_timeout,
        )


class RedisInbox:
    """One caller instance's reply stream and the connection that reads it."""

    def __init__(self, broker: RedisBroker, token: str) -> None:
        self.address = SCHEME + token
        self.key = broker.prefix + "reply:" + token
        self._broker = broker
        self._url = broker.url
        settings = broker.settings
        self._backoff = (settings.reconnect_initial_backoff, settings.reconnect_max_backoff)
        self._command_timeout = settings.command_timeout
        # Connections of its own: a blocking read holds one for seconds, and the broker's
        # pool must not lose it; a second one creates and deletes the stream meanwhile.
        self._pool = ConnectionPool.from_url(
            broker.url,
            decode_responses=False,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=None,
            max_connections=2,
            client_name=f"wirework-reply-{token}"[:120],
        )
        self._closed = False
        self._reading = False

    async def _command(self, *commands: tuple[Any, ...], what: str) -> list[Any]:
        """``commands`` pipelined on one connection (one round trip); their replies."""
        with translate(what, self._url):
            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                async with asyncio.timeout(self._command_timeout):
                    await connection.send_packed_command(connection.pack_commands(commands))
                    return [await connection.read_response() for _ in commands]
            except BaseException:
                await connection.disconnect()
                raise
            finally:
                await self._pool.release(connection)

    async def create(self) -> None:
        """The stream, empty, expiring ``TTL`` from now; in one transaction, so that a
        crash between the two steps cannot leave a stream that never expires."""
        await self._command(
            ("MULTI",),
            ("XADD", self.key, "MAXLEN", 0, "*", "o", b""),
            ("PEXPIRE", self.key, int(TTL * 1000)),
            ("EXEC",),
            what=f"creating reply inbox {self.address!r}",
        )

    def __aiter__(self) -> AsyncIterator[WireMessage]:
        if self._reading:
            raise BrokerError(f"reply inbox {self.address!r} is already being read")
        self._reading = True
        return self._replies()

    async def _replies(self) -> AsyncIterator[WireMessage]:
        backoff = Backoff(*self._backoff)
        loop = asyncio.get_running_loop()
        last = b"0-0"
        trim: bytes | None = None
        untrimmed = 0
        renew_at = 0.0  # the first read renews: the stream may have waited since create()
        connection: Any = None
        missing = False
        try:
            while not self._closed and not self._broker._closed:
                started = loop.time()
                renew = started >= renew_at
                try:
                    if missing:
                        await self.create()
                        missing, last = False, b"0-0"
                    if connection is None:
                        with translate(f"reading reply inbox {self.address!r}", self._url):
                            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                    if renew or untrimmed >= TRIM_AFTER:
                        entries, exists = await self._read(connection, last, trim, renew)
                        trim, untrimmed = None, 0
                    else:
                        entries, exists = await self._read(connection, last, None, False)
                except BrokerError as exc:
                    if connection is not None:
                        await self._drop(connection)
                        connection = None
                    if self._closed:
                        return
                    log.warning("reply inbox %s: %s; reconnecting", self.address, exc)
                    renew_at = 0.0
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                if renew:
                    renew_at = started + RENEW
                if not exists and not self._closed:
                    missing = True
                    log.warning(
                        "reply inbox %s was gone from %s (expired during an outage, or the "
                        "server lost its data); replies sent meanwhile are lost",
                        self.address,
                        where(self._url),
                    )
                    continue
                for entry_id, fields in entries:
                    last = trim = entry_id
                    untrimmed += 1
                    yield _message(fields)
                if entries:
                    # The callers these replies woke run first: the next read is a socket
                    # write, which would otherwise go before any of them got its answer.
                    await asyncio.sleep(0)
        finally:
            if connection is not None:
                await self._drop(connection)

    async def _read(
        self, connection: Any, last: bytes, trim: bytes | None, renew: bool
    ) -> tuple[list[Any], bool]:
        """Wait for replies after ``last``; with ``renew``, first renew the expiry (its
        answer says whether the stream still exists), with ``trim``, delete what was
        read: up to three commands, one round trip. Whether the stream exists is known
        only on a renewal (True otherwise).

        Packed by hiredis (in C): redis-py's own packing took a tenth of a round trip
        on the caller's path, right after each reply."""
        commands: list[bytes] = []
        if renew:
            commands.append(_pack("PEXPIRE", self.key, int(TTL * 1000)))
        if trim is not None:
            commands.append(_pack("XTRIM", self.key, "MINID", trim))
        commands.append(
            _pack("XREAD", "COUNT", BATCH, "BLOCK", int(BLOCK * 1000), "STREAMS", self.key, last)
        )
        with translate(f"reading reply inbox {self.address!r}", self._url):
            await connection.send_packed_command(b"".join(commands), check_health=False)
            replies = [await connection.read_response() for _ in commands]
        exists = replies[0] == 1 if renew else True
        found = replies[-1]
        entries: Any
        if isinstance(found, dict):  # RESP3
            entries = next(iter(found.values()), [])
        else:
            entries = found[0][1] if found else []
        return list(entries or []), exists

    async def _drop(self, connection: Any) -> None:
        """A reading connection in an unknown state (cut, or cancelled mid-read): closed."""
        with contextlib.suppress(Exception):
            await connection.disconnect()
        with contextlib.suppress(Exception):
            await self._pool.release(connection)

    async def aclose(self) -> None:
        """Delete the stream and close the inbox's connections; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._command(("UNLINK", self.key), what=f"deleting reply inbox {self.address!r}")
        except BrokerError as exc:
            # Unreachable: the stream expires by itself within TTL.
            log.warning("reply inbox %s not deleted (%s); it expires in %gs", self.key, exc, TTL)
        finally:
            with contextlib.suppress(Exception):
                await self._pool.aclose()


def _pack(*command: Any) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed


def _message(fields: Any) -> WireMessage:
    if isinstance(fields, dict):
        record = fields
    else:
        record = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
    return WireMessage(headers=orjson.loads(record[b"h"]), body=bytes(record[b"b"]))
