"""The Redis backend's connection: scripts, outcomes, reconnection and wake-ups.

Every call runs one Lua script (``redis_scripts``: FCALL of the library's
function, or EVALSHA where Redis has no Functions), or one plain command
(``redis_scripts.Command``: a reply's ``XADD``), on a connection that is
connected and clean: kept by the link after whole replies and checked before
reuse (redis-py's own check: no pending data, no end of file), or new from
redis-py's pool. So a failure *before* the script was sent is a definite one: the
call had no effect. A failure *after* it was sent has an unknown outcome: the
script may have run. ``Link.call`` keeps the two apart, because the broker
contract lets ``publish`` report a failure only when nothing was stored:

* ``resend=True`` (publish with its dedup id, settles, reads: all idempotent)
  sends again once the connection is back, until the deadline;
* ``wait=False`` (``on_disconnect="fail"``) fails at once while the
  connection is known to be down and nothing was sent yet.

A lost connection starts one prober task that pings with exponential backoff
and jitter until the server answers; callers wait for it instead of hammering
a dead server. ``Doorbell`` listens on the namespace's pub/sub channels so an
idle subscription wakes when another process publishes or settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from wirework.brokers.redis_scripts import LIBRARY, Command, Script
from wirework.clock import Clock
from wirework.errors import (
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DeadlineExceededError,
    PublishOutcomeUnknownError,
    QueueFullError,
)

log = logging.getLogger("wirework.brokers.redis")

#: How long the doorbell's read waits before it looks at the channels it should hold.
_LISTEN_TICK = 0.25


class GroupMissingError(BrokerError):
    """The consumer group is gone from the server (deleted, or a restart without persistence)."""


def where(url: str) -> str:
    """The URL without credentials, for messages and logs (RELIABILITY.md §3.6)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@contextlib.contextmanager
def translate(what: str, url: str) -> Iterator[None]:
    """Turn redis-py's errors into wirework's, saying what failed and what to do."""
    try:
        yield
    except AuthenticationError as exc:
        raise ConfigurationError(
            f"Redis at {where(url)} refused the credentials while {what}: {exc}; "
            f"check the user and password in the URL"
        ) from exc
    except OutOfMemoryError as exc:
        raise QueueFullError(
            f"Redis at {where(url)} is at its maxmemory limit and refused {what}; nothing was "
            f"stored: consume or trim, or raise maxmemory (and keep maxmemory-policy noeviction)"
        ) from exc
    except ReadOnlyError as exc:
        raise BrokerUnavailableError(
            f"Redis at {where(url)} is a read-only replica and refused {what}; "
            f"point the URL at the primary"
        ) from exc
    except ResponseError as exc:
        text = str(exc)
        if "NOGROUP" in text:
            raise GroupMissingError(f"consumer group missing on {where(url)} while {what}") from exc
        if "unknown command" in text.lower() and "waitaof" in text.lower():
            raise ConfigurationError(
                f"wait_aof needs Redis 7.2 or later (WAITAOF), and {where(url)} is older; "
                f"turn wait_aof off and set appendfsync always on the server instead"
            ) from exc
        if "WAITAOF cannot be used" in text:
            raise ConfigurationError(
                f"wait_aof needs appendonly yes on {where(url)}: {text}"
            ) from exc
        raise BrokerError(f"Redis at {where(url)} refused {what}: {text}") from exc
    except (RedisError, OSError) as exc:  # ConnectionError, TimeoutError, BusyLoadingError, ...
        raise BrokerUnavailableError(
            f"Redis at {where(url)} is unreachable while {what} ({type(exc).__name__}: {exc}); "
            f"retry later"
        ) from exc


async def _exchange(connection: Any, command: tuple[Any, ...]) -> Any:
    """One command and its reply; packed by hiredis (in C: redis-py packs in Python)."""
    await connection.send_packed_command(hiredis.pack_command(command), check_health=False)
    return await connection.read_response()


def _no_functions(exc: ResponseError) -> bool:
    """The server has no FCALL (Redis before 7) or this user may not call it."""
    text = str(exc).lower()
    return "unknown command" in text or "noperm" in text or "no permissions" in text


class Backoff:
    """Exponential delays with jitter between ``initial`` and ``maximum`` seconds."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next(self) -> float:
        raw = min(self.maximum, self.initial * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return raw * self._rng.uniform(0.5, 1.0)


class Link:
    """One broker's pool of connections to Redis, with outcome-aware calls.

    Args:
        url: the Redis URL (credentials stay inside the pool).
        clock: deadlines and the sleeps between reconnect attempts run on it.
        connect_timeout: seconds to open a TCP connection (the handshake gets
            ``command_timeout`` more).
        command_timeout: seconds one command or script may take, round trip included.
        backoff: (initial, maximum) seconds between reconnect attempts.
        max_connections: the pool's limit.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        connect_timeout: float,
        command_timeout: float,
        backoff: tuple[float, float],
        max_connections: int,
    ) -> None:
        self.url = url
        self.clock = clock
        self._connect_timeout = connect_timeout + command_timeout  # handshake included
        self._command_timeout = command_timeout
        self._backoff = backoff
        try:
            self.pool = ConnectionPool.from_url(
                url,
                decode_responses=False,
                socket_connect_timeout=connect_timeout,
                # No socket_timeout: with one, redis-py sends under asyncio.wait_for, which
                # on Python 3.11 can swallow a cancellation (gh-86296) and leave a closing
                # subscription hanging. The timeouts are ours (asyncio.timeout) instead.
                socket_timeout=None,
                # Retries are ours: redis-py's would re-send without knowing the outcome.
                retry=Retry(NoBackoff(), 0),
                max_connections=max_connections,
                client_name="wirework",
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid Redis URL {where(url)!r}: {exc}; write redis://host:6379/0"
            ) from exc
        # redis-py's pool raises at once when it is exhausted; callers queue here instead.
        # Two connections stay free: the doorbell's and the prober's.
        self._slots_total = max(1, max_connections - 2)
        self._slots = asyncio.Semaphore(self._slots_total)
        self.up = asyncio.Event()
        self.up.set()
        self.closed = False
        self._prober: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        # Connections between calls, each after whole replies: taken and given back without
        # the pool's lock and bookkeeping, which cost more than the call's own work.
        self._idle: list[Any] = []
        self._open = 0
        """Connections of ``_take``'s, idle or running a call."""
        self._opening = asyncio.Lock()
        self._changed = asyncio.Event()
        self._functions = True
        """False once the server turned out to have no Functions (or refuses them)."""

    async def call(
        self,
        script: Script | Command,
        args: Sequence[str | bytes | int],
        *,
        what: str,
        resend: bool,
        wait: bool,
        timeout: float,
        wait_aof_ms: int | None = None,
        until: Callable[[], float | None] | None = None,
    ) -> Any:
        """Run ``script`` with ``args`` (ARGV[1] is the key prefix, also its one KEYS entry),
        or a plain ``Command`` with ``args`` as its arguments.

        ``timeout`` does not count the time the call waits for its turn (a free
        connection: every running call holds one), so a burst of thousands of
        calls queues here instead of timing out for the queue in front of it.
        That wait ends at ``until()`` (seconds from now: the message's own
        deadline), if it gives one; every turn comes within one ``timeout``.

        With ``wait_aof_ms``, ``WAITAOF 1 0`` follows on the same connection (it
        waits for the writes of the connection it runs on), so the call returns
        only once the local AOF holds the script's writes on disk.

        Raises:
            BrokerUnavailableError: the connection is down and (``wait=False``) nothing
                was sent, or the deadline passed; the message says if the outcome is unknown.
            BrokerClosedError: the broker was closed meanwhile.
            DeadlineExceededError: ``until`` passed while the call waited its turn; not sent.
        """
        deadline = self.clock.monotonic() + timeout
        sent = False
        while True:
            if self.closed:
                raise BrokerClosedError(f"the Redis broker on {where(self.url)} is closed")
            if not self.up.is_set():
                if not wait and not sent:
                    raise BrokerUnavailableError(
                        f"Redis at {where(self.url)} is unreachable (reconnecting); "
                        f"{what} was not sent: retry later, or use on_disconnect='wait'"
                    )
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    raise self._gave_up(what, sent)
                # Up again may mean down again before we run: the loop looks once more.
                await self.wait_up(remaining)
                continue
            if self._slots.locked():  # only then is there something to wait for
                started = self.clock.monotonic()
                await self._turn(what, sent, until() if until is not None else None)
                deadline += self.clock.monotonic() - started  # waiting its turn is not late
            else:
                await self._slots.acquire()
            try:
                try:
                    with translate(what, self.url):
                        connection = await self._take()
                except BrokerUnavailableError as exc:
                    self.lost(exc)
                    if not wait and not sent:
                        raise
                    continue
                sent = True
                return await self._send(connection, script, args, what, wait_aof_ms)
            except BrokerUnavailableError as exc:
                if not sent:
                    raise
                self.lost(exc)
                if not resend:
                    raise PublishOutcomeUnknownError(
                        f"{exc}; the outcome of {what} is unknown"
                    ) from exc.__cause__
            finally:
                self._slots.release()

    async def _turn(self, what: str, sent: bool, until: float | None) -> None:
        """Wait for a free connection, at most ``until`` seconds when that is given."""
        try:
            async with asyncio.timeout(until):
                await self._slots.acquire()
        except TimeoutError:
            if sent:  # a re-send after an outage: the first copy may be stored
                raise self._gave_up(what, sent) from None
            raise DeadlineExceededError(
                f"the deadline of {what} passed while it waited for one of the "
                f"{self._slots_total} connections to Redis at {where(self.url)} "
                f"(max_connections); it was not sent"
            ) from None

    async def _send(
        self,
        connection: Any,
        script: Script | Command,
        args: Sequence[str | bytes | int],
        what: str,
        wait_aof_ms: int | None,
    ) -> Any:
        """One script (and WAITAOF) on ``connection``, under one ``command_timeout``.

        The connection goes back to the idle ones only after whole replies; after
        anything else (cut, timeout, cancellation) its state is unknown and it is closed.
        """
        whole = False
        try:
            with translate(what, self.url):
                try:
                    async with asyncio.timeout(self._command_timeout):
                        result = await self._run(connection, script, args)
                except ResponseError:
                    whole = True  # an error reply is a whole reply
                    raise
                if wait_aof_ms is not None:
                    async with asyncio.timeout(self._command_timeout + wait_aof_ms / 1000):
                        local, _replicas = await _exchange(
                            connection, ("WAITAOF", 1, 0, wait_aof_ms)
                        )
            whole = True
            if wait_aof_ms is not None and int(local) < 1:
                raise BrokerError(
                    f"{what} is in Redis's memory but its AOF fsync was not confirmed "
                    f"within {wait_aof_ms} ms (wait_aof_timeout); it may or may not survive "
                    f"a crash of the Redis host"
                )
            return result
        finally:
            await self._give_back(connection, whole)

    async def _take(self) -> Any:
        """An idle connection that is still clean and open, else a new one from the pool.

        The check is redis-py's own (pending data or end of file, seen by the event
        loop, no round trip), so a connection the server or a cut closed while idle is
        replaced before anything is sent on it: a failure then means "not sent".

        New connections are opened one at a time, each from a fresh turn of the
        event loop, and a failure to open one while others are open is congestion,
        not an outage: under a burst the event loop can be too busy to finish a
        healthy connect within ``connect_timeout``, so the call waits for one of the
        open connections instead of failing (and declaring Redis unreachable for
        every other call). With none open, the failure is an outage, as before.
        """
        while True:
            connection = await self._idle_connection()
            if connection is not None:
                return connection
            changed = self._changed
            async with self._opening:
                connection = await self._idle_connection()  # given back meanwhile
                if connection is not None:
                    return connection
                if not self.up.is_set():  # found down meanwhile: no connect attempt each
                    raise BrokerUnavailableError(
                        f"Redis at {where(self.url)} is unreachable (reconnecting)"
                    )
                # Connect from the next turn of the event loop: callers started together
                # (asyncio.gather of thousands) run their first steps in one turn, and the
                # connect_timeout of a connect begun in it would count all of their work.
                await asyncio.sleep(0)
                try:
                    connection = await self.connection()
                except (RedisError, OSError) as exc:
                    if not self._open:
                        raise
                    log.debug("no new connection to %s (%r); waiting for one", where(self.url), exc)
                else:
                    self._open += 1
                    return connection
            await changed.wait()

    async def _idle_connection(self) -> Any:
        while self._idle:
            connection = self._idle.pop()
            try:
                if connection.is_connected and not await connection.can_read():
                    return connection
            except (RedisError, OSError):
                pass
            await self._drop(connection)
        return None

    def _change(self) -> None:
        """Wake the calls waiting for a connection: one was given back or closed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _give_back(self, connection: Any, whole: bool) -> None:
        if whole and not self.closed:
            self._idle.append(connection)
            self._change()
        else:
            await self._drop(connection)

    async def _drop(self, connection: Any) -> None:
        """Close a connection in an unknown state and return it to the pool (which reopens it)."""
        self._open -= 1
        self._change()
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.pool.release(connection)

    async def connection(self) -> Any:
        """A connected, clean connection from the pool; release it with ``pool.release``."""
        async with asyncio.timeout(self._connect_timeout):
            return await self.pool.get_connection()  # type: ignore[no-untyped-call]

    def _gave_up(self, what: str, sent: bool) -> BrokerUnavailableError:
        if sent:
            return PublishOutcomeUnknownError(
                f"Redis at {where(self.url)} did not come back in time; the outcome of {what} "
                f"is unknown (it was sent before the connection broke): it may have been stored"
            )
        return BrokerUnavailableError(
            f"Redis at {where(self.url)} did not come back in time; {what} was not sent"
        )

    async def _run(
        self, connection: Any, script: Script | Command, args: Sequence[str | bytes | int]
    ) -> Any:
        """FCALL of the script's function (loading the library once per server if it is
        missing), or EVALSHA/EVAL where the server has no functions (Redis before 7) or
        the user may not use them. The prefix is the one declared key: it names the hash
        slot of the namespace. A ``Command`` is sent as it is."""
        if isinstance(script, Command):
            return await _exchange(connection, (script.name, *args))
        if script.function is not None and self._functions:
            call = ("FCALL", script.function, 1, args[0], *args)
            try:
                return await _exchange(connection, call)
            except ResponseError as exc:
                if "function not found" not in str(exc).lower():
                    if not _no_functions(exc):
                        raise
                    self._functions = False
            if self._functions and await self._load_library(connection):
                return await _exchange(connection, call)
        try:
            return await _exchange(connection, ("EVALSHA", script.sha, 1, args[0], *args))
        except NoScriptError:
            return await _exchange(connection, ("EVAL", script.source, 1, args[0], *args))

    async def _load_library(self, connection: Any) -> bool:
        """``FUNCTION LOAD`` the library; False (and EVAL from now on) if the server refuses."""
        try:
            await _exchange(connection, ("FUNCTION", "LOAD", LIBRARY.code))
        except ResponseError as exc:
            if "already exists" in str(exc):
                return True  # another connection or process loaded it meanwhile
            log.info("Redis at %s refused FUNCTION LOAD (%s); using EVALSHA", where(self.url), exc)
            self._functions = False
            return False
        return True

    async def command(self, *args: str | bytes | int, what: str) -> Any:
        """One plain command, sent once (reads, purge); translated errors."""
        if self.closed:
            raise BrokerClosedError(f"the Redis broker on {where(self.url)} is closed")
        whole = False
        with translate(what, self.url):
            connection = await self._take()
            try:
                async with asyncio.timeout(self._command_timeout):
                    try:
                        reply = await _exchange(connection, args)
                    except ResponseError:
                        whole = True
                        raise
                whole = True
                return reply
            finally:
                await self._give_back(connection, whole)

    async def wait_up(self, timeout: float | None) -> bool:
        """Wait until the connection is back (True), the broker closes or ``timeout`` passes."""
        if self.up.is_set():
            return True
        if timeout is not None and timeout <= 0:
            return False
        waits: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self.up.wait()),
            asyncio.ensure_future(self._closing.wait()),
        }
        if timeout is not None:
            waits.add(asyncio.ensure_future(self.clock.sleep(timeout)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return self.up.is_set() and not self.closed

    def lost(self, exc: BaseException) -> None:
        """Note a broken connection; one prober reconnects with backoff."""
        if self.closed:
            return
        if self.up.is_set():
            log.warning("lost the connection to Redis at %s: %s", where(self.url), exc)
        self.up.clear()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        backoff = Backoff(*self._backoff)
        while not self.closed:
            try:
                with translate("reconnecting", self.url):
                    connection = await self.connection()
                    try:
                        async with asyncio.timeout(self._command_timeout):
                            await connection.send_command("PING")
                            await connection.read_response()
                    finally:
                        await self.pool.release(connection)
            except BrokerError:
                await self.clock.sleep(backoff.next())
                continue
            log.info("reconnected to Redis at %s", where(self.url))
            self.up.set()
            return

    async def aclose(self) -> None:
        self.closed = True
        self._closing.set()
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._drop(connection)
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(BaseException):
                await self._prober
        with contextlib.suppress(Exception):
            await self.pool.aclose()


class Bell(asyncio.Event):
    """A subscription's wake-up. ``rung``: set by a ring (look again: fetch), not only by
    a hand-over (``hand``: what came with it is all there is to take)."""

    def __init__(self) -> None:
        super().__init__()
        self.rung = False

    def set(self) -> None:
        self.rung = True
        super().set()

    def hand(self) -> None:
        super().set()

    def clear(self) -> None:
        self.rung = False
        super().clear()


Receiver = Callable[[list[bytes]], None]
"""Takes the rows a publish handed over to one consumer (``ROW_FIELDS`` per row, as a fetch's)."""


#: The first byte of a wake-up's payload in the format ``handovers`` reads.
HANDOVER_FORMAT = b"\x01"


class _Frames:
    """Reads a hand-over payload: a string is its length (4 bytes, big-endian) and its
    bytes. Anything that runs past the end raises ValueError: a payload of another
    version or a stray PUBLISH is refused, never read as short rows."""

    __slots__ = ("at", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.at = 1

    def number(self, size: int) -> int:
        at = self.at
        self.at = end = at + size
        if end > len(self.payload):
            raise ValueError("a hand-over payload ends in the middle of a number")
        return int.from_bytes(self.payload[at:end], "big")

    def string(self) -> bytes:
        size = self.number(4)
        at = self.at
        self.at = end = at + size
        if end > len(self.payload):
            raise ValueError("a hand-over payload ends in the middle of a string")
        return self.payload[at:end]


def handovers(payload: bytes) -> list[tuple[str, list[bytes], bool]]:
    """(consumer, rows, full) per hand-over in a wake-up's payload (``redis_lua``'s
    ``hand_over`` writes it): per consumer its name, its row count and whether its room is
    used up, then per row its member, headers, body and key if it has one. The rows come
    out as a fetch returns them, ROW_FIELDS fields each: a hand-over is a first delivery
    (attempt 1, no failure recorded). All of it is read before any of it is handed out."""
    if not payload.startswith(HANDOVER_FORMAT):
        raise ValueError("not a hand-over payload of this version")
    frames = _Frames(payload)
    end = len(payload)
    found: list[tuple[str, list[bytes], bool]] = []
    while frames.at < end:
        consumer = frames.string().decode()
        count = frames.number(4)
        full = frames.number(1) == 1
        rows: list[bytes] = []
        for _ in range(count):
            member, headers, body = frames.string(), frames.string(), frames.string()
            if frames.number(1) == 1:
                rows += (member, b"1", b"", headers, body, b"1", frames.string())
            else:
                rows += (member, b"1", b"", headers, body, b"0", b"")
        found.append((consumer, rows, full))
    return found


class Doorbell:
    """Wakes local subscriptions of a topic: on pub/sub messages from any process, or
    directly when this process changed the topic; and hands each subscription what a
    publish handed over to its consumer (``redis_scripts``: hand-over).

    Pub/sub is at-most-once, so the doorbell only shortens waits: every
    subscription also wakes at its next known due time and at ``poll_interval``.
    After a reconnect it rings every topic, as messages sent meanwhile were missed.
    """

    def __init__(self, link: Link, prefix: str) -> None:
        self._link = link
        self._prefix = prefix
        self._waiters: dict[str, set[Bell]] = {}
        self._receivers: dict[str, tuple[Bell, Receiver]] = {}
        self._task: asyncio.Task[None] | None = None
        self._listening: set[str] = set()
        self.losses = 0
        """Times the listening connection broke: what it was to carry may be lost."""

    def listening(self, topic: str) -> bool:
        """Whether wake-ups (and hand-overs) of ``topic`` reach this process now."""
        return self.channel(topic) in self._listening

    def channel(self, topic: str) -> str:
        return f"{self._prefix}w:{topic}"

    def waiter(
        self, topic: str, consumer: str | None = None, receive: Receiver | None = None
    ) -> Bell:
        """A bell for a subscription of ``topic``; with ``receive``, also what is handed
        over to ``consumer`` goes to it (``forget`` with the consumer's name stops that)."""
        event = Bell()
        self._waiters.setdefault(topic, set()).add(event)
        if consumer is not None and receive is not None:
            self._receivers[consumer] = (event, receive)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        return event

    def forget(self, topic: str, event: Bell, consumer: str | None = None) -> None:
        events = self._waiters.get(topic)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[topic]
        if consumer is not None:
            self._receivers.pop(consumer, None)

    def ring(self, topic: str, *, spare: frozenset[Bell] = frozenset()) -> None:
        for event in self._waiters.get(topic, ()):
            if event not in spare:
                event.set()

    def _hand(self, payload: bytes) -> frozenset[Bell]:
        """Give each hand-over to its subscription; the bells of those that got one (they
        need no ring for it). A consumer no longer here is skipped: its release hands
        its copies back (or their leases run out)."""
        served: set[Bell] = set()
        for consumer, rows, full in handovers(payload):
            found = self._receivers.get(consumer)
            if found is not None:
                bell, receive = found
                receive(rows)
                if full:
                    bell.set()  # its registration is gone: it fetches (once it has room)
                else:
                    bell.hand()
                served.add(bell)
        return frozenset(served)

    def _hand_safely(self, payload: bytes | None, channel: str) -> frozenset[Bell]:
        """``_hand``, but a wake-up this version cannot read is only a ring: the listener
        must outlive it (another wirework version on the server, a stray PUBLISH), and a
        copy it carried stays leased to its consumer, who recovers it as after a loss."""
        if not payload:
            return frozenset()
        try:
            return self._hand(payload)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("unreadable wake-up on %s (%d bytes): rung instead", channel, len(payload))
            self.losses += 1
            return frozenset()

    def ring_all(self) -> None:
        for topic in list(self._waiters):
            self.ring(topic)

    async def _listen(self) -> None:
        backoff = Backoff(*self._link._backoff)
        while not self._link.closed:
            pubsub = PubSub(self._link.pool, ignore_subscribe_messages=True)
            try:
                with translate("listening for wake-ups", self._link.url):
                    held: set[str] = set()
                    self._listening = held
                    while not self._link.closed:
                        wanted = {self.channel(topic) for topic in self._waiters}
                        if held - wanted:
                            async with asyncio.timeout(self._link._command_timeout):
                                await pubsub.unsubscribe(*(held - wanted))
                            held &= wanted
                        if wanted - held:
                            first = not held
                            async with asyncio.timeout(self._link._command_timeout):
                                await pubsub.subscribe(*(wanted - held))
                            held |= wanted
                            if first:
                                self.ring_all()  # what was sent before we listened was missed
                        if not held:
                            await self._link.clock.sleep(_LISTEN_TICK)
                            continue
                        found = await self._next_message(pubsub)
                        backoff.reset()
                        if found is not None:
                            name, data = found
                            spare = self._hand_safely(data, name)
                            self.ring(name.removeprefix(f"{self._prefix}w:"), spare=spare)
                            if spare:
                                # The subscriptions it handed messages to run first: the
                                # next read (a timeout and a parser turn) would otherwise
                                # go before any of them took its message.
                                await asyncio.sleep(0)
            except BrokerError as exc:
                self._listening = set()
                self.losses += 1  # hand-overs on their way may be gone with the connection
                self._link.lost(exc)
                self.ring_all()
                await self._link.clock.sleep(backoff.next())
            finally:
                self._listening = set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    @staticmethod
    async def _next_message(pubsub: PubSub) -> tuple[str, bytes | None] | None:
        """The next published message's (channel, data) within ``_LISTEN_TICK``, or None.

        A message is read straight off the connection: it is on the way of every
        hand-over (a request to a quiet responder), and redis-py's ``get_message``
        wraps each read in a health check, a retry policy (ours makes no retries), a
        dict and a metrics lookup. Anything else (a subscribe or unsubscribe
        confirmation) goes through ``handle_message``, which keeps the subscription's
        own bookkeeping. Errors are the read's, as ``get_message`` raises them.
        """
        connection = pubsub.connection
        if connection is None:
            return None
        response = await connection.read_response(
            timeout=_LISTEN_TICK, disconnect_on_error=False, push_request=True
        )
        if response is None:
            return None
        if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
            channel, data = response[1], response[2]
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            return name, data if isinstance(data, bytes) or data is None else str(data).encode()
        message = await pubsub.handle_message(response, ignore_subscribe_messages=True)
        if message is not None and message.get("type") == "message":
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            return name, message.get("data")
        return None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.ring_all()
