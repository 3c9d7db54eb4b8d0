"""Request-reply over any broker that keeps the contract.

A request carries ``replyto`` (where its caller reads replies) and a
``deadline`` extension; the reply carries ``causationid`` = the request's id,
which is how it finds its caller. Every request ends by its deadline with a
reply or ``RequestTimeoutError``, and its pending entry is gone either way;
replies that arrive for nobody (late, or a second copy after a redelivery) are
dropped and counted.

Where replies come in, per instance:

* a *direct inbox* when the broker has a reply path (``DirectReplies``: Redis,
  RabbitMQ, NATS): an ephemeral server-side inbox with no group, lease or ack,
  removed at stop. The request itself is still a durable publish to the
  responder's topic; only the way back is direct;
* else a *reply topic* (``wirework.reply.<service>.<instance>``) read through
  the full contract and deleted at stop (memory, SQLite, where it is cheap).

A responder answers a direct address through its broker's reply path and any
other ``replyto`` (a topic name: an older caller, or one without a reply path)
on that topic, so callers and responders of either kind work together.

A direct inbox that loses its server-side object for good (RabbitMQ's direct
reply-to dies with its channel) fails the requests waiting on it at once with
``ReplyLostError`` instead of letting them run into their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from wirework.brokers.base import (
    Broker,
    DeadLetterReason,
    Delivery,
    DirectReplies,
    Failure,
    GroupAdmin,
    ReplyInbox,
    ReplyPath,
    Subscription,
)
from wirework.clock import Clock, SystemClock
from wirework.envelope import Envelope, WireMessage, decode_wire, encode_binary
from wirework.errors import (
    BrokerError,
    DecodeError,
    RemoteError,
    ReplyLostError,
    RequestTimeoutError,
    TooManyPendingRequestsError,
)
from wirework.resilience.carriers import DEADLINE_EXTENSION as DEADLINE_EXTENSION

log = logging.getLogger("wirework.requests")

ERROR_EVENT_TYPE = "wirework.error"
MAX_PENDING_REQUESTS = 10_000
_REMEMBERED = 10_000


class RemoteFailure(BaseModel):
    """The body of an error reply: what went wrong on the responder's side."""

    error_type: str
    message: str
    reason: str = "handler_error"


@dataclass
class RequestStats:
    """Counts since start, from the caller's side."""

    sent: int = 0
    replied: int = 0
    timed_out: int = 0
    remote_errors: int = 0
    late_replies: int = 0
    duplicate_replies: int = 0
    undecodable_replies: int = 0
    lost: int = 0
    """Requests failed with ``ReplyLostError``: their inbox died while they waited."""


class _Recent:
    """A bounded memory of request ids, to tell a late reply from a duplicate."""

    def __init__(self, size: int = _REMEMBERED) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids


def deadline_passed(envelope: Envelope, now: datetime) -> bool:
    """Whether a request's ``deadline`` extension lies in the past (no deadline: never)."""
    raw = envelope.extensions.get(DEADLINE_EXTENSION)
    if raw is None:
        return False
    try:
        deadline = datetime.fromisoformat(raw)
    except ValueError:
        return False
    if deadline.tzinfo is None:
        return False  # not ours (we write UTC offsets): ignored, as a malformed one is
    return deadline <= now


def reply_path(broker: Broker) -> ReplyPath | None:
    """The broker's direct reply path, or None where replies travel on topics."""
    return broker.direct_replies() if isinstance(broker, DirectReplies) else None


def direct_sender(path: ReplyPath) -> Callable[[str, Envelope, str | None, float], Awaitable[None]]:
    """A publish function (the innermost of the publish middleware) that sends a reply
    to a direct inbox address instead of a topic."""

    async def send(address: str, envelope: Envelope, key: str | None, delay: float) -> None:
        await path.send_reply(address, encode_binary(envelope))

    return send


class Requester:
    """One instance's side of request-reply: where its replies come in, and its pending requests.

    Args:
        broker: the service's broker; its reply path is used if it has one.
        reply_topic: the instance's reply topic (and the owner name of its direct inbox).
        clock: deadlines run on it.
        publish: how a request is published (the service's publish middleware included).
        max_pending: requests that may wait at once (RELIABILITY.md §3.7).
        direct: use the broker's reply path when it has one; False keeps the reply topic.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        reply_topic: str,
        clock: Clock,
        publish: Callable[[str, Envelope], Awaitable[None]],
        max_pending: int = MAX_PENDING_REQUESTS,
        direct: bool = True,
    ) -> None:
        self.reply_topic = reply_topic
        self.stats = RequestStats()
        self._broker = broker
        self._clock = clock
        self._publish = publish
        self._max_pending = max_pending
        self._path = reply_path(broker) if direct else None
        self._inbox: ReplyInbox | None = None
        self._opened = False
        self._closed = False
        self._pending: dict[str, tuple[asyncio.Future[Envelope], str]] = {}
        self._answered = _Recent()
        self._abandoned = _Recent()
        self._lost_addresses = _Recent(64)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def direct(self) -> bool:
        """Whether replies come in through a direct inbox (else through the reply topic)."""
        return self._path is not None

    @property
    def reply_address(self) -> str:
        """What goes in a request's ``replyto``: the inbox address, or the reply topic."""
        return self._inbox.address if self._inbox is not None else self.reply_topic

    async def open(self) -> None:
        """Create where replies come in, so a request sent right after start gets its reply.

        Raises:
            BrokerError: the broker could not create it; nothing was left behind.
        """
        if self._path is not None:
            self._inbox = await self._path.open_reply_inbox(
                self.reply_topic, on_lost=self._inbox_lost
            )
        elif isinstance(self._broker, GroupAdmin):
            reply = self.reply_topic
            await self._broker.declare_group(Subscription(topic=reply, group=reply))
        self._opened = True

    async def run(self) -> None:
        """Read replies until cancelled; then remove the inbox or reply topic (``close``)."""
        try:
            if self._inbox is not None:
                async for message in self._inbox:
                    self._resolve(message)
            else:
                await self._read_topic()
        finally:
            for future, _ in self._pending.values():
                if not future.done():
                    future.cancel()
            await asyncio.shield(self.close())

    async def close(self) -> None:
        """Remove the inbox, or forget the reply topic, so restarts leave nothing behind."""
        if self._closed or not self._opened:
            return
        self._closed = True
        if self._inbox is not None:
            with contextlib.suppress(BrokerError):
                await self._inbox.aclose()
        elif isinstance(self._broker, GroupAdmin):
            with contextlib.suppress(BrokerError):
                await self._broker.delete_group(self.reply_topic, self.reply_topic)

    async def _read_topic(self) -> None:
        subscription = Subscription(
            topic=self.reply_topic, group=self.reply_topic, start="earliest", prefetch=512
        )
        deliveries = self._broker.subscribe(subscription)
        try:
            async with asyncio.TaskGroup() as settling:
                async for delivery in deliveries:
                    self._resolve(delivery.message)
                    settling.create_task(self._ack(delivery))
        finally:
            with contextlib.suppress(Exception):
                await deliveries.aclose()

    async def request(self, subject: str, envelope: Envelope, timeout: float) -> Envelope:
        """Publish ``envelope`` to ``subject`` and wait for its reply until ``timeout``.

        Raises:
            RequestTimeoutError: no reply in time; the request may still be handled.
            RemoteError: the responder failed, or dead-lettered the request.
            ReplyLostError: the reply inbox died with its connection while the request
                waited (or before it was sent); the request may still be handled.
            TooManyPendingRequestsError: ``max_pending`` requests already wait.
        """
        if len(self._pending) >= self._max_pending:
            raise TooManyPendingRequestsError(
                f"{len(self._pending)} requests already wait for replies on this instance "
                f"(limit {self._max_pending}); slow down or raise max_pending"
            )
        address = envelope.replyto or ""
        if address in self._lost_addresses:
            self.stats.lost += 1
            raise ReplyLostError(subject, address)
        started = self._clock.monotonic()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[envelope.id] = (future, address)
        try:
            await self._publish(subject, envelope)
            self.stats.sent += 1
            remaining = timeout - (self._clock.monotonic() - started)
            reply = await self._wait(future, remaining)
        except TimeoutError:
            self.stats.timed_out += 1
            self._abandoned.add(envelope.id)
            raise RequestTimeoutError(subject, timeout) from None
        except ReplyLostError as exc:
            self.stats.lost += 1
            self._abandoned.add(envelope.id)
            raise ReplyLostError(subject, exc.address) from None
        finally:
            self._pending.pop(envelope.id, None)
        if reply.type == ERROR_EVENT_TYPE:
            self.stats.remote_errors += 1
            failure = reply.decode(RemoteFailure)
            raise RemoteError(failure.error_type, failure.message, reason=failure.reason)
        return reply

    async def _wait(self, future: asyncio.Future[Envelope], remaining: float) -> Envelope:
        if future.done():  # answered (or lost) while the request was being published
            return future.result()
        if remaining <= 0:
            raise TimeoutError
        if isinstance(self._clock, SystemClock):
            # One timer handle per request that fails the request's own future: at the
            # deadline one callback and one step of the waiting task, where
            # wait_for(shield()) took three rounds of the loop (release its waiter, cancel
            # the shield, wait for that) and two more futures. The future is this
            # request's alone, so a cancelled caller may cancel it (``_resolve`` skips a
            # done one).
            timer = asyncio.get_running_loop().call_later(remaining, _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved, should a cancellation have overtaken it
        sleeper = asyncio.ensure_future(self._clock.sleep(remaining))
        waits: set[asyncio.Future[Any]] = {future, sleeper}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if not future.done():
            raise TimeoutError
        return future.result()

    def _inbox_lost(self, address: str) -> None:
        """The inbox at ``address`` is gone for good: its waiting requests fail now."""
        self._lost_addresses.add(address)
        for future, sent_to in self._pending.values():
            if sent_to == address and not future.done():
                future.set_exception(ReplyLostError("", address))

    def _resolve(self, message: WireMessage) -> None:
        try:
            reply = decode_wire(message)
        except DecodeError:
            self.stats.undecodable_replies += 1
            log.warning("undecodable reply on %s dropped", self.reply_address)
            return
        request_id = reply.causationid or ""
        entry = self._pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(reply)
            self._answered.add(request_id)
            self.stats.replied += 1
        elif request_id in self._answered:
            self.stats.duplicate_replies += 1
        else:
            self.stats.late_replies += 1

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except BrokerError as exc:
            log.debug("reply ack failed (%s); the reply may come again and be dropped", exc)


def _expire(future: asyncio.Future[Envelope]) -> None:
    """A request's deadline: its wait ends with ``TimeoutError`` unless it already ended."""
    if not future.done():
        future.set_exception(TimeoutError())


def error_reply_body(reason: DeadLetterReason | str, failure: Failure) -> RemoteFailure:
    """What an error reply says about a failed or dead-lettered request."""
    return RemoteFailure(
        error_type=failure.error_type,
        message=failure.message,
        reason=reason.value if isinstance(reason, DeadLetterReason) else reason,
    )
