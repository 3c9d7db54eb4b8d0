"""Request-reply over any broker that keeps the contract.

Each service instance reads its own reply topic; a request carries ``replyto``
(that topic) and a ``deadline`` extension, and the reply carries
``causationid`` = the request's id, which is how it finds its caller. Every
request ends by its deadline with a reply or ``RequestTimeoutError``, and its
pending entry is gone either way; replies that arrive for nobody (late, or a
second copy after a redelivery) are acked, dropped and counted.
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
    Failure,
    GroupAdmin,
    Subscription,
)
from wirework.clock import Clock, SystemClock
from wirework.envelope import Envelope, decode_wire
from wirework.errors import (
    BrokerError,
    DecodeError,
    RemoteError,
    RequestTimeoutError,
    TooManyPendingRequestsError,
)

log = logging.getLogger("wirework.requests")

ERROR_EVENT_TYPE = "wirework.error"
DEADLINE_EXTENSION = "deadline"
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
    return deadline <= now


class Requester:
    """One instance's side of request-reply: its reply topic and its pending requests."""

    def __init__(
        self,
        broker: Broker,
        *,
        reply_topic: str,
        clock: Clock,
        publish: Callable[[str, Envelope], Awaitable[None]],
        max_pending: int = MAX_PENDING_REQUESTS,
    ) -> None:
        self.reply_topic = reply_topic
        self.stats = RequestStats()
        self._broker = broker
        self._clock = clock
        self._publish = publish
        self._max_pending = max_pending
        self._pending: dict[str, asyncio.Future[Envelope]] = {}
        self._answered = _Recent()
        self._abandoned = _Recent()
        self._ready = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Read the reply topic until cancelled; then forget it, so restarts leave nothing."""
        subscription = Subscription(
            topic=self.reply_topic, group=self.reply_topic, start="earliest", prefetch=512
        )
        deliveries = self._broker.subscribe(subscription)
        try:
            async with asyncio.TaskGroup() as settling:
                self._ready.set()
                async for delivery in deliveries:
                    self._resolve(delivery)
                    settling.create_task(self._ack(delivery))
        finally:
            with contextlib.suppress(Exception):
                await deliveries.aclose()
            for future in self._pending.values():
                if not future.done():
                    future.cancel()
            if isinstance(self._broker, GroupAdmin):
                with contextlib.suppress(BrokerError):
                    await asyncio.shield(
                        self._broker.delete_group(self.reply_topic, self.reply_topic)
                    )

    async def request(self, subject: str, envelope: Envelope, timeout: float) -> Envelope:
        """Publish ``envelope`` to ``subject`` and wait for its reply until ``timeout``.

        Raises:
            RequestTimeoutError: no reply in time; the request may still be handled.
            RemoteError: the responder failed, or dead-lettered the request.
            TooManyPendingRequestsError: ``max_pending`` requests already wait.
        """
        if len(self._pending) >= self._max_pending:
            raise TooManyPendingRequestsError(
                f"{len(self._pending)} requests already wait for replies on this instance "
                f"(limit {self._max_pending}); slow down or raise max_pending"
            )
        started = self._clock.monotonic()
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[envelope.id] = future
        try:
            await self._publish(subject, envelope)
            self.stats.sent += 1
            remaining = timeout - (self._clock.monotonic() - started)
            reply = await self._wait(future, remaining)
        except TimeoutError:
            self.stats.timed_out += 1
            self._abandoned.add(envelope.id)
            raise RequestTimeoutError(subject, timeout) from None
        finally:
            self._pending.pop(envelope.id, None)
        if reply.type == ERROR_EVENT_TYPE:
            self.stats.remote_errors += 1
            failure = reply.decode(RemoteFailure)
            raise RemoteError(failure.error_type, failure.message, reason=failure.reason)
        return reply

    async def _wait(self, future: asyncio.Future[Envelope], remaining: float) -> Envelope:
        if remaining <= 0:
            raise TimeoutError
        if isinstance(self._clock, SystemClock):
            # One timer handle per request: cheaper than a sleeping task at thousands in flight.
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        sleeper = asyncio.ensure_future(self._clock.sleep(remaining))
        waits: set[asyncio.Future[Any]] = {future, sleeper}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if not future.done():
            raise TimeoutError
        return future.result()

    def _resolve(self, delivery: Delivery) -> None:
        try:
            reply = decode_wire(delivery.message)
        except DecodeError:
            self.stats.undecodable_replies += 1
            log.warning("undecodable reply on %s dropped", self.reply_topic)
            return
        request_id = reply.causationid or ""
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)
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


def error_reply_body(reason: DeadLetterReason | str, failure: Failure) -> RemoteFailure:
    """What an error reply says about a failed or dead-lettered request."""
    return RemoteFailure(
        error_type=failure.error_type,
        message=failure.message,
        reason=reason.value if isinstance(reason, DeadLetterReason) else reason,
    )
