"""One NATS connection for the JetStream backend: connect, reconnect, requests, errors.

nats-py reconnects by itself (and re-subscribes); this wraps it so that:

* reconnection waits grow exponentially with jitter (``reconnect_initial_backoff``
  up to ``reconnect_max_backoff``) instead of nats-py's fixed wait;
* nothing is buffered while disconnected (``pending_size=0``): a call during an
  outage fails at once and can never be sent later behind the caller's back, which
  is what lets a failed publish be a *definite* failure;
* a request in flight when the connection drops ends at once (``Lost``) instead of
  waiting out its timeout;
* every client-library error is translated at this boundary, in ``translate``.

Requests (publishes awaiting their PubAck, JetStream API calls) share one reply
subscription per connection, ``<inbox>.*``, and a future per request: nats-py's
own ``request`` adds ``wait_for`` and a token per call, and racing it against a
"connection dropped" event took two more tasks per call; here a dropped
connection fails the futures in flight directly.

Plain acks (``ack``) are queued, and every ack queued in one turn of the event
loop goes out in one socket write on the next turn (or with a core publish,
such as a pull request, written before then), so a consumer's acks share
writes without waiting for other traffic. nats-server (2.9) handles a JetStream
ack before it answers or flushes whatever else the same read brought, so an ack
never rides on a write that waits for an answer:

* not on a JetStream publish (``request``): the ack's removal of its message
  would come first and hold the PubAck back, which a serial publisher waits
  for (bench workload 9e, one producer awaiting each publish, 6 interleaved
  pairs of runs: median 3,780 -> 4,090 msg/s; the full workload then measured
  0.99x raw nats-py, whose ``msg.ack()`` is a write of its own);
* not on a direct reply's write (``nats_replies``), and not right behind one:
  an ack queued within ``ACK_DELAY`` of a reply waits that long, so the server
  reads the reply alone. Measured with nats-py alone (responder acking in the
  reply's write, or 5 ms later): p50 1.47x the core round trip instead of 1.30x.

Direct replies (``reply``) of one turn share a write at the start of the next:
a write per reply made nats-server read and forward each alone. With 64
requests in flight that cost CPU (per request: responder 165 -> 120 us, server
115 -> 60 us) and the rate with it (bench workload 10o, four alternating pairs
of quick runs: 0.29-0.50x -> 0.50-0.74x raw), one at a time unchanged.

Received header blocks are parsed by ``parse_header_lines`` (what nats-py 2.16
does, without its per-character generator; the same result for every input):
every message a subscription or a request gets has a dozen CloudEvents headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg

from wirework.errors import BrokerClosedError, BrokerError, BrokerUnavailableError, WireworkError

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsSettings

log = logging.getLogger("wirework.brokers.nats")


class NotSent(Exception):
    """The connection was down: nothing left this process (a definite failure)."""


class Lost(Exception):
    """The connection dropped while a request was in flight: its outcome is unknown."""


class JetStreamRefusedError(BrokerError):
    """JetStream answered a request with an error (``err_code`` as the server numbers it)."""

    def __init__(self, what: str, error: Mapping[str, Any]) -> None:
        self.code = int(error.get("code") or 0)
        self.err_code = int(error.get("err_code") or 0)
        self.description = str(error.get("description") or "")
        super().__init__(
            f"JetStream refused {what}: {self.description} (code {self.code}/{self.err_code})"
        )


#: JetStream error codes the backend acts on.
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
STREAM_NAME_IN_USE = 10058
CONSUMER_NAME_IN_USE = 10013
CONSUMER_EXISTS = 10105
CONSUMER_NOT_UPDATABLE = 10012
WRONG_LAST_SEQUENCE = 10071
STREAM_STORE_FULL = (10077, 10078)  # maximum messages / bytes exceeded

#: The status header of the server's answer to a request nobody listens to.
_NO_RESPONDERS = "503"

#: Seconds an ack queued right after a direct reply waits, so the reply is read alone.
ACK_DELAY = 0.005

_UNREACHABLE = (
    NotSent,
    Lost,
    OSError,
    TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
)


#: What ``str.isspace`` is true for among ASCII characters (a header name is ASCII).
_ASCII_SPACE = re.compile(r"[\t\n\x0b\x0c\r\x1c-\x1f ]")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py 2.16's ``Client._parse_header_lines``, with the same result for every input.

    It tests each header name for whitespace with a generator over its characters,
    about a tenth of the CPU a small message costs here; one regular expression
    search does the same test.
    """
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _ASCII_SPACE.search(key) is not None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def _ack_command(reply: str) -> bytes:
    """The protocol line of a plain ack (what ``nc.publish(reply, b"+ACK")`` writes)."""
    return f"PUB {reply} 4\r\n+ACK\r\n".encode()


@dataclass(frozen=True)
class Stored:
    """A message read back from a stream (direct get)."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


async def publish_block(
    nc: Client, subject: str, reply: str, block: bytes, payload: bytes, *, flush: bool = True
) -> None:
    """What nats-py's ``publish`` does (2.16, its checks in its order), for a header block
    already built: its own encoding checked and encoded every header of every message again.

    Subjects are built by ``nats_wire`` from checked names, so they are not checked again.
    Without ``flush``, the command is only added to nats-py's unwritten data, for a caller
    that writes it itself (``Connection.reply``).
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc.is_connected:
        raise nats.errors.OutboundBufferLimitError  # nothing is buffered (pending_size=0)
    if len(payload) > nc.max_payload:
        raise nats.errors.MaxPayloadError
    size = len(block)
    line = f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    await nc._send_command(b"".join((line, block, payload, b"\r\n")))
    if flush and nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


class _Deadline:
    """Fails a request's future with a timeout once its time is up.

    The clock starts on the event loop's next turn, not when the request was
    written: a caller that sends thousands of requests in one turn blocks the
    loop for seconds, and replies read only after that turn must not find
    their requests timed out by the caller's own work.
    """

    __slots__ = ("_future", "_seconds", "_timer")

    def __init__(self, future: asyncio.Future[Msg], seconds: float) -> None:
        self._future = future
        self._seconds = seconds
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._future.done():
            self._timer = self._future.get_loop().call_later(self._seconds, self._expire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        if not self._future.done():
            self._future.set_exception(nats.errors.TimeoutError())


def redacted(url: str) -> str:
    """The URL without user and password (RELIABILITY.md §3.6)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Connection:
    """A lazily opened, self-healing NATS connection shared by one broker."""

    def __init__(self, url: str, settings: NatsSettings) -> None:
        self.url = url
        self.where = redacted(url)
        self.settings = settings
        self.generation = 0
        """Raised on every (re)connection: a pull request of an older one is gone."""
        self._nc: Client | None = None
        self._lock = asyncio.Lock()
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._closed = False
        self.watchers: set[asyncio.Event] = set()
        """Events set on every reconnection (subscriptions renew their pull requests)."""
        self._replies: dict[str, asyncio.Future[Msg]] = {}
        self._reply_prefix = ""
        self._tokens = itertools.count(1)
        self._acks: list[str] = []
        self._ack_timer: asyncio.Handle | None = None
        self._ack_writer: asyncio.Task[None] | None = None
        self._replied_at = -ACK_DELAY
        """When (event loop time) a direct reply was last queued (``reply``)."""
        self._reply_writer: asyncio.Handle | None = None
        self._flush_kick: asyncio.Task[Any] | None = None

    # -- life cycle -----------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Connected right now (nats-py's own state; the callbacks lag it slightly)."""
        return self._nc is not None and self._nc.is_connected and not self._closed

    async def client(self) -> Client:
        """The connected client, connecting on first use.

        Raises:
            BrokerUnavailableError: the server does not answer, or has no JetStream.
            BrokerClosedError: the connection was closed.
        """
        if self._closed:
            raise BrokerClosedError(f"the NATS broker on {self.where} is closed")
        if self._nc is not None:
            return self._nc
        async with self._lock:
            if self._nc is None:
                self._nc = await self._connect()
            return self._nc

    async def _connect(self) -> Client:
        nc = Client()
        options = self.settings
        try:
            async with asyncio.timeout(options.connect_timeout):
                await nc.connect(
                    servers=[self.url],
                    name="wirework",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=options.reconnect_initial_backoff,  # type: ignore[arg-type]
                    reconnect_to_server_handler=self._backoff,
                    connect_timeout=options.connect_timeout,  # type: ignore[arg-type]
                    ping_interval=options.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=2,
                    pending_size=0,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_disconnected,
                )
        except (*_UNREACHABLE, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerUnavailableError(
                f"cannot connect to NATS at {self.where} ({type(exc).__name__}: {exc}); "
                f"check that nats-server runs there, then retry"
            ) from exc
        # An instance attribute shadows the static method nats-py calls as
        # ``self._parse_header_lines`` (2.16); the result is the same, see its docstring.
        setattr(nc, "_parse_header_lines", parse_header_lines)  # noqa: B010
        self.generation += 1
        self._down.clear()
        self._up.set()
        try:
            # nats-py subscribes again after every reconnection: the prefix never changes.
            self._reply_prefix = nc.new_inbox() + "."
            await nc.subscribe(self._reply_prefix + "*", cb=self._on_reply)
            await nc.request("$JS.API.INFO", b"", timeout=options.api_timeout)
        except nats.errors.NoRespondersError as exc:
            await nc.close()
            raise BrokerUnavailableError(
                f"NATS at {self.where} has no JetStream; start nats-server with -js "
                f"(and a store directory, -sd)"
            ) from exc
        except (*_UNREACHABLE, nats.errors.Error) as exc:
            await nc.close()
            raise BrokerUnavailableError(
                f"JetStream at {self.where} did not answer ({type(exc).__name__}); retry later"
            ) from exc
        return nc

    def _backoff(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        """nats-py asks this before every reconnection attempt: exponential, jittered."""
        # Workaround (nats-py 2.16): each attempt reuses one transport object and replaces
        # its socket without closing one that connected but never got the server's INFO
        # (a half-open or blackholed server), leaking it until GC. Close it first.
        transport = getattr(self._nc, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        server = servers[0] if servers else None
        attempts = server.reconnects if server is not None else 0
        options = self.settings
        delay = min(
            options.reconnect_max_backoff,
            options.reconnect_initial_backoff * 2 ** min(attempts, 30),
        )
        return server, delay * random.uniform(0.5, 1.0)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS connection to %s: %s: %s", self.where, type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        self._up.clear()
        self._down.set()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(Lost())

    async def _on_reply(self, msg: Msg) -> None:
        future = self._replies.get(msg.subject[len(self._reply_prefix) :])
        if future is not None and not future.done():
            future.set_result(msg)

    async def _on_reconnected(self) -> None:
        self.generation += 1
        self._down.clear()
        self._up.set()
        for event in self.watchers:
            event.set()
        log.info("reconnected to NATS at %s", self.where)

    async def wait_up(self, timeout: float) -> bool:
        """Wait until connected (or ``timeout``); True if connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                return False
            if self._nc is None:
                with contextlib.suppress(BrokerUnavailableError):
                    await self.client()
                continue
            # The reconnected callback wakes this early; the short poll covers its lag.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._up.wait()
            if not self.up:
                self._up.clear()
        return True

    async def aclose(self) -> None:
        await self.write_acks()
        self._closed = True
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        self._up.clear()
        self._down.set()

    # -- calls --------------------------------------------------------------------------

    @contextlib.contextmanager
    def translate(self, what: str) -> Iterator[None]:
        """Turn nats-py errors into wirework's (one place for the whole backend)."""
        try:
            yield
        except WireworkError:
            raise
        except nats.errors.MaxPayloadError as exc:
            raise BrokerError(f"{what}: over the server's max_payload ({exc})") from exc
        except nats.errors.NoRespondersError as exc:
            raise BrokerUnavailableError(
                f"nothing answered while {what} on NATS at {self.where}: is JetStream on, "
                f"and does the stream still exist?"
            ) from exc
        except _UNREACHABLE as exc:
            if self._closed:
                raise BrokerClosedError(f"the NATS broker on {self.where} is closed") from exc
            raise BrokerUnavailableError(
                f"NATS at {self.where} did not answer while {what} "
                f"({type(exc).__name__}); retry later"
            ) from exc
        except nats.errors.Error as exc:
            raise BrokerError(f"NATS failed while {what}: {type(exc).__name__}: {exc}") from exc

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: dict[str, str] | bytes | None = None,
        timeout: float | None = None,
    ) -> Msg:
        """A request that ends as soon as the connection drops.

        ``headers`` are a dict, or a header block built by ``nats_wire.header_block``.

        Raises:
            NotSent: the connection was down, nothing was sent.
            Lost: the connection dropped before the reply.
            nats.errors.TimeoutError: no reply within ``timeout``.
            nats.errors.NoRespondersError: nothing listens on ``subject``.
        """
        nc = self._nc if self._nc is not None else await self.client()
        if not self.up:
            raise NotSent
        # Queued acks stay queued: in front of a request they would hold its answer back.
        token = str(next(self._tokens))
        reply = self._reply_prefix + token
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._replies[token] = future
        clock = _Deadline(future, timeout or self.settings.api_timeout)
        try:
            try:
                if isinstance(headers, bytes):
                    await publish_block(nc, subject, reply, headers, payload)
                else:
                    await nc.publish(subject, payload, reply=reply, headers=headers)
            except nats.errors.OutboundBufferLimitError as exc:
                raise NotSent from exc  # disconnected since the look above
            loop.call_soon(clock.start)
            msg = await future
        finally:
            clock.stop()
            del self._replies[token]
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def publish(self, subject: str, payload: bytes = b"", *, reply: str = "") -> None:
        """A core publish (settles, pull requests, notifications); fails at once while down."""
        nc = self._nc if self._nc is not None else await self.client()
        try:
            if self._acks and nc.is_connected:
                self._hand_over_acks(nc)  # written with this publish, in the same socket write
            await nc.publish(subject, payload, reply=reply)
        except Exception:
            with self.translate(f"publishing to {subject}"):
                raise

    async def reply(self, subject: str, block: bytes, payload: bytes) -> None:
        """Send a direct reply (a core publish of a ready header block, ``nats_replies``).

        Every reply of one turn of the event loop goes out in one socket write at the
        start of the next (``_write_replies``): ahead of nats-py's flusher, which a turn
        later would leave the reply behind the responder's follow-up work, and without a
        write (and a server read, and a forwarded packet) per reply, which with many
        requests in flight cost more CPU than the rest of the reply's way.

        Raises:
            nats.errors.Error: as ``publish_block`` (translated by the caller).
        """
        nc = self._nc if self._nc is not None else await self.client()
        await publish_block(nc, subject, "", block, payload, flush=False)
        loop = asyncio.get_running_loop()
        self._replied_at = loop.time()
        if self._reply_writer is None:
            self._reply_writer = loop.call_soon(self._write_replies)
        transport = nc._transport
        if transport is not None:
            # Waits only while the socket does not take what was written before.
            await transport.drain()  # type: ignore[no-untyped-call]

    def _write_replies(self) -> None:
        """Write what nats-py has unwritten (the replies of the last turn, in order with
        anything queued before them); where that cannot be done, its flusher does."""
        self._reply_writer = None
        nc = self._nc
        if nc is None or not nc._pending:
            return
        transport = nc._transport
        if nc.is_connected and transport is not None and nc._flusher_task is not None:
            try:
                transport.writelines(nc._pending[:])
            except OSError:
                pass  # left pending: the flusher writes it, or reports the error as it does
            else:
                nc._pending = []
                nc._pending_data_size = 0
                return
        if self._flush_kick is None or self._flush_kick.done():
            self._flush_kick = asyncio.ensure_future(nc._flush_pending())

    def ack(self, reply: str) -> None:
        """Queue a plain ack (``+ACK``), written on the event loop's next turn together with
        every other ack queued meanwhile; ``ACK_DELAY`` later if a direct reply was just written.

        Raises:
            BrokerUnavailableError: not connected (nothing was queued).
            BrokerClosedError: the connection was closed.
        """
        if self._closed:
            raise BrokerClosedError(f"the NATS broker on {self.where} is closed")
        if not self.up:
            raise BrokerUnavailableError(
                f"not connected to NATS at {self.where}: the ack was not sent, the message "
                f"comes back when its lease runs out"
            )
        self._acks.append(reply)
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            behind_reply = ACK_DELAY - (loop.time() - self._replied_at)
            if behind_reply > 0:
                self._ack_timer = loop.call_later(behind_reply, self._acks_due)
            else:
                self._ack_timer = loop.call_soon(self._acks_due)

    def _take_acks(self, nc: Client) -> list[bytes]:
        """Every queued ack as its protocol line, what ``nc.publish(reply, b"+ACK")`` adds,
        without its checks and encoding per ack; the queue is left empty."""
        acks, self._acks = self._acks, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        nc.stats["out_msgs"] += len(acks)
        nc.stats["out_bytes"] += 4 * len(acks)
        return [_ack_command(reply) for reply in acks]

    def _hand_over_acks(self, nc: Client) -> None:
        """Put every queued ack in nats-py's unwritten data, to go with the caller's write."""
        for command in self._take_acks(nc):
            nc._pending.append(command)
            nc._pending_data_size += len(command)

    def _acks_due(self) -> None:
        """Write the queued acks to the socket now, in a write of their own: in this callback,
        not on nats-py's flusher's next turn (one more round of the event loop), and not
        with what nats-py has pending (a publish waiting for its PubAck, which they would
        share a server read with). Where that cannot be done, the flusher writes them
        (``write_acks``)."""
        self._ack_timer = None
        nc = self._nc
        if not self._acks or nc is None:
            return
        transport = nc._transport
        if nc.is_connected and transport is not None:
            commands = self._take_acks(nc)
            try:
                transport.writelines(commands)
            except OSError:  # nats-py's reader sees the connection fail and reconnects
                log.debug("%d acks not written to %s: the write failed", len(commands), self.where)
            return
        if self._ack_writer is None:
            self._ack_writer = asyncio.ensure_future(self.write_acks())
            self._ack_writer.add_done_callback(self._ack_written)

    def _ack_written(self, task: asyncio.Task[None]) -> None:
        self._ack_writer = None

    async def write_acks(self) -> None:
        """Hand every queued ack to nats-py at once, so one socket write carries them.

        An ack that cannot be written (the connection dropped meanwhile) is dropped:
        its message comes back when its lease runs out, a duplicate, never a loss.
        """
        nc = self._nc
        if nc is None or not self._acks:
            return
        if not nc.is_connected:  # nothing is buffered while disconnected (pending_size=0)
            log.debug("%d acks not written to %s: disconnected", len(self._acks), self.where)
            self._acks = []
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
            return
        self._hand_over_acks(nc)
        try:
            await nc._flush_pending()
        except Exception as exc:
            log.debug("acks not written to %s: %r", self.where, exc)

    async def api(self, subject: str, body: Mapping[str, Any] | None, *, what: str) -> Any:
        """A JetStream API request (``$JS.API.<subject>``) and its decoded answer.

        Raises:
            JetStreamRefusedError: JetStream answered with an error.
            BrokerUnavailableError: no answer.
        """
        payload = b"" if body is None else json.dumps(body).encode()
        with self.translate(what):
            msg = await self.request(f"$JS.API.{subject}", payload)
        answer = json.loads(msg.data)
        if "error" in answer:
            raise JetStreamRefusedError(what, answer["error"])
        return answer

    async def direct_get(
        self,
        stream: str,
        *,
        seq: int | None = None,
        next_by_subj: str | None = None,
        last_by_subj: str | None = None,
    ) -> Stored | None:
        """One stored message (by sequence, next on a subject, or last on a subject).

        None when there is none. The stream must exist: JetStream does not answer a
        direct get of a missing stream at all, so the caller would wait out the timeout.
        """
        body: dict[str, Any] = {}
        if seq is not None:
            body["seq"] = max(1, seq)
        if next_by_subj is not None:
            body["next_by_subj"] = next_by_subj
        if last_by_subj is not None:
            body["last_by_subj"] = last_by_subj
        with self.translate(f"reading stream {stream}"):
            try:
                msg = await self.request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode())
            except nats.errors.NoRespondersError:
                return None
        headers = {str(k): v for k, v in (msg.headers or {}).items()}
        status = headers.get("Status")
        if status is not None and "Nats-Sequence" not in headers:
            if status in ("404", "408"):
                return None
            raise BrokerError(f"JetStream refused a read of {stream}: status {status}")
        return Stored(int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data)

    async def scan(
        self, stream: str, subject_filter: str, *, start: int = 1, limit: int = 10_000
    ) -> list[Stored]:
        """Messages on ``subject_filter`` from sequence ``start`` on, oldest first."""
        found: list[Stored] = []
        while len(found) < limit:
            stored = await self.direct_get(stream, seq=start, next_by_subj=subject_filter)
            if stored is None:
                break
            found.append(stored)
            start = stored.seq + 1
        return found

    async def delete_message(self, stream: str, seq: int) -> None:
        """Remove one message for good (no tombstone left behind)."""
        with contextlib.suppress(JetStreamRefusedError):  # already gone
            await self.api(
                f"STREAM.MSG.DELETE.{stream}",
                {"seq": seq, "no_erase": True},
                what=f"deleting message {seq} of {stream}",
            )

    async def stream_list(self, subject_filter: str) -> list[dict[str, Any]]:
        """Info of every stream with subjects under ``subject_filter``."""
        streams: list[dict[str, Any]] = []
        while True:
            page = await self.api(
                "STREAM.LIST",
                {"subject": subject_filter, "offset": len(streams)},
                what="listing streams",
            )
            streams.extend(page.get("streams") or [])
            if not page.get("streams") or len(streams) >= page.get("total", 0):
                return streams

    async def consumer_list(self, stream: str) -> list[dict[str, Any]]:
        consumers: list[dict[str, Any]] = []
        while True:
            page = await self.api(
                f"CONSUMER.LIST.{stream}",
                {"offset": len(consumers)},
                what=f"listing consumers of {stream}",
            )
            consumers.extend(page.get("consumers") or [])
            if not page.get("consumers") or len(consumers) >= page.get("total", 0):
                return consumers

    async def ensure_stream(self, config: Mapping[str, Any]) -> None:
        """Create a stream unless one of that name exists (whatever its settings)."""
        name = config["name"]
        try:
            await self.api(f"STREAM.CREATE.{name}", config, what=f"creating stream {name}")
        except JetStreamRefusedError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
