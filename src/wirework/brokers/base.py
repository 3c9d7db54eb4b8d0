"""The broker contract: what every backend promises, in one small abstract class.

Everything asynchronous is a *topic* read by *consumer groups*; a queue is a
topic read by one group. A backend maps this onto its own primitives and must
pass the conformance suite (``wirework.testing.conformance``), which checks the
eight points of the contract:

1. A message published to a topic reaches every group subscribed to it, and
   inside a group one consumer at a time.
2. ``publish`` returns only once the broker holds the message durably.
3. A message leaves a group only when its delivery is acked; ``nack`` makes it
   available again after a delay with its attempt count raised; ``dead_letter``
   moves it to the group's dead letters with the reason and error.
4. A delivery not settled within its lease (``lease_timeout``) is handed to
   another consumer: a crashed consumer loses nothing.
5. Deliveries carry raw bytes; a message that cannot be decoded still arrives,
   so the consumer can dead-letter it (decoding is not the backend's job).
6. Messages with the same ``key`` are handed out in publish order within a
   group: the next one only once the previous one is settled.
7. ``publish(..., delay=s)`` holds a message back for ``s`` seconds.
8. A subscription holds at most ``prefetch`` unsettled deliveries; the rest
   waits in the broker.

Retries, backoff, decoding, idempotency and tracing are middleware around the
handler (``wirework.consumer``), not a backend's job.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wirework.envelope import WireMessage
from wirework.errors import ConfigurationError, MessageTooLargeError

#: Topic, group and consumer names: safe in SQL identifiers, Redis keys, AMQP and NATS subjects.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

#: The broker-message size limit shipped by default (RELIABILITY.md §3.7), NATS's max_payload.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024

#: Longest error text kept in a dead-letter record (RELIABILITY.md P5).
MAX_ERROR_MESSAGE_CHARS = 1024

StartPosition = Literal["earliest", "latest"]


def check_name(kind: str, name: str) -> str:
    """Validate a topic/group name, raising ``ConfigurationError`` that says the rule."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use 1-200 characters from A-Z a-z 0-9 . _ -"
        )
    return name


class DeadLetterReason(StrEnum):
    """Why a message was dead-lettered; a closed set, as RabbitMQ's ``x-death`` reasons."""

    MAX_DELIVERIES = "max_deliveries"
    DESERIALIZATION_ERROR = "deserialization_error"
    SCHEMA_VALIDATION = "schema_validation"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    TOO_LARGE = "too_large"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Failure(BaseModel):
    """The error a handler attempt ended with, as kept with the message."""

    model_config = ConfigDict(frozen=True)

    error_type: str
    message: str
    field: str | None = None

    @field_validator("message")
    @classmethod
    def _truncate(cls, value: str) -> str:
        if len(value) <= MAX_ERROR_MESSAGE_CHARS:
            return value
        return value[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        return cls(
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            message=str(exc),
            field=getattr(exc, "field", None),
        )


class Subscription(BaseModel):
    """Where and how a group reads a topic.

    ``lease_timeout`` is how long a delivery stays with one consumer before it
    is handed to another (per group on backends whose server holds it per
    consumer group, such as NATS: the last subscription to join sets it);
    ``prefetch`` bounds the unsettled deliveries one subscription holds;
    ``start`` decides what a *new* group sees: everything still retained
    (``earliest``) or only what is published after it was created
    (``latest``). An existing group keeps its position.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str
    group: str
    start: StartPosition = "earliest"
    lease_timeout: float = Field(default=30.0, gt=0)
    prefetch: int = Field(default=10, ge=1, le=10_000)

    @field_validator("topic", "group")
    @classmethod
    def _names(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError("use 1-200 characters from A-Z a-z 0-9 . _ -")
        return value


class DeadLetter(BaseModel):
    """A dead-lettered message with what RELIABILITY.md P5 asks a record to carry."""

    model_config = ConfigDict(frozen=True)

    id: str
    topic: str
    group: str
    message_id: str | None
    reason: DeadLetterReason
    attempts: int
    first_failure_at: datetime
    last_failure_at: datetime
    dead_lettered_at: datetime
    error: Failure | None
    message: WireMessage
    key: str | None = None


class GroupStats(BaseModel):
    """One group's view of one topic, for ``wirework topics``."""

    model_config = ConfigDict(frozen=True)

    topic: str
    group: str | None
    ready: int
    delayed: int
    in_flight: int
    dead_lettered: int

    @property
    def backlog(self) -> int:
        return self.ready + self.delayed + self.in_flight


class Delivery(ABC):
    """One message handed to one consumer of a group, settled exactly once.

    A delivery that lost its message (its lease ran out and the message went
    to another consumer, or its subscription was left and the message taken
    again) settles without effect: the call returns, counted in its broker's
    ``stale_settles``, or raises ``BrokerError``, and the message's current
    holder is untouched. A settle after the lease ran out may be ignored even
    if nobody took the message yet (a network backend cannot tell); the
    message then simply comes back. Backend detail (row id, delivery tag,
    stream id) lives on the subclass.
    """

    message: WireMessage
    topic: str
    group: str
    key: str | None
    attempt: int
    """1 for the first delivery, raised by every redelivery (nack, lease expiry, release)."""
    first_failure_at: datetime | None
    """When an attempt of this message first failed, if one has."""

    @property
    @abstractmethod
    def settled(self) -> bool:
        """Whether ack, nack or dead_letter has been called."""

    @abstractmethod
    async def ack(self) -> None:
        """Done: the message leaves this group for good.

        Raises:
            AlreadySettledError: the delivery was settled before.
            BrokerError: the ack could not be recorded; the message will come back.
        """

    def exceeds(self, limit: int) -> bool:
        """Whether the message is over ``limit`` bytes, counted as ``WireMessage.size`` counts.

        Asked of every delivery. A backend that holds a cheap upper bound of the
        size (SQLite: the stored bytes) answers most of them without counting.
        """
        return self.message.size > limit

    def start_ack(self) -> asyncio.Future[None] | None:
        """``ack()`` begun now, for a caller with other work meanwhile; None: await ``ack()``.

        The delivery counts as settled from this call on, and the future ends as
        ``ack()`` would return, or raise: the promise is ``ack()``'s, the ack is
        recorded once the future is done without an error.
        A backend that queues its acks anyway hands out its own future (SQLite);
        the default is None, since wrapping ``ack()`` in a task would cost more
        than the wait it saves where an ack is a frame written at once.

        Raises:
            AlreadySettledError: the delivery was settled before.
            BrokerError: the ack cannot be begun; the message will come back.
        """
        return None

    @abstractmethod
    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        """Not done: make the message available again in ``delay`` seconds.

        ``error`` is kept and reported in the dead-letter record if it ends there.

        Raises:
            AlreadySettledError: the delivery was settled before.
            BrokerError: the nack could not be recorded; the lease will run out instead.
        """

    @abstractmethod
    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        """Give up: move the message to this group's dead letters.

        Raises:
            AlreadySettledError: the delivery was settled before.
            BrokerError: the move could not be recorded; the lease will run out instead.
        """


class Broker(ABC):
    """A messaging backend; open with ``wirework.brokers.connect(url)``."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    stale_settles: int = 0
    """Settles that returned without effect: their delivery had lost its message.

    Not an error (at-least-once expects late settles after a lease ran out),
    but a rising count says handlers outlive their leases: raise
    ``lease_timeout``, or handle faster.
    """

    @abstractmethod
    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Store ``message`` on ``topic``; return once the broker holds it durably.

        Raises:
            MessageTooLargeError: over ``max_message_bytes``; nothing was stored.
            QueueFullError: the topic is at its length limit; nothing was stored.
            BrokerBusyError, BrokerUnavailableError: nothing was stored; retry later.
            PublishOutcomeUnknownError: sent, but the connection broke before the
                broker answered; it may have been stored (publish the same
                CloudEvent again and let consumers deduplicate).
            DeadlineExceededError: the message's own deadline (a request's) passed
                while it waited its turn in the client (Redis, RabbitMQ); nothing was
                sent.
            ConfigurationError: the topic name is invalid.
        """

    @abstractmethod
    def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        """Deliveries for one consumer of ``subscription.group``, until the broker closes.

        Creates the group on first use (position from ``subscription.start``).
        Closing the generator (``aclose()``, cancellation, or ``break`` inside
        ``contextlib.aclosing``) hands every unsettled delivery it held back to
        the group at once, attempt counted. A plain ``break`` hands them back
        only when the generator is collected; use ``aclosing``.

        Retention: a message settled by every group that held it is removed; a
        message published while a topic has no group is kept until the first
        group appears, and creating a ``latest`` group drops such messages. A
        new ``earliest`` group gets at least what was kept for no group; on
        memory, SQLite, Redis and NATS also what other groups still hold, on
        RabbitMQ not (each group is its own queue there).

        Raises:
            BrokerClosedError: the broker was closed.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections and end every subscription; safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def check_size(self, topic: str, message: WireMessage) -> None:
        """Refuse an oversized message before anything is written."""
        if message.size > self.max_message_bytes:
            raise MessageTooLargeError(message.size, self.max_message_bytes, topic=topic)


@runtime_checkable
class DeadLetterStore(Protocol):
    """A backend whose dead letters can be listed, read and replayed (all shipped ones)."""

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        """Dead letters, oldest first, filtered by any of topic, group and reason."""
        ...

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter. Raises ``DeadLetterNotFoundError``."""
        ...

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        """Hand dead letters back to the group that failed them, attempt count reset.

        The message keeps its id (so an idempotent consumer recognises it) and
        goes only to its original group, not to every group of the topic. The
        dead-letter record is removed in the same step. Returns how many moved.
        Raises ``DeadLetterNotFoundError`` (and moves none) if an id is unknown.
        """
        ...


@runtime_checkable
class Inspectable(Protocol):
    """A backend that can report its topics and groups (all shipped ones)."""

    async def stats(self) -> Sequence[GroupStats]:
        """One row per (topic, group); a topic without groups has one row with group None."""
        ...


@runtime_checkable
class GroupAdmin(Protocol):
    """A backend that manages groups explicitly (all shipped ones).

    ``declare_group`` lets a service create its groups *before* it reports
    itself started, so nothing published afterwards can miss a group that was
    still being created; ``delete_group`` removes short-lived groups such as a
    service instance's reply topic, so that restarts leave nothing behind.
    """

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group at ``subscription.start`` if it is new; an existing group is
        left as it is. Returns once the group exists on the broker."""
        ...

    async def delete_group(self, topic: str, group: str) -> None:
        """Forget ``group`` on ``topic`` with its undelivered messages; no error if absent.

        Meant for groups nobody reads any more: a subscription still running on
        the group is not ended by it. Deleting a topic's last group may drop a
        message published to the topic at that same instant.
        """
        ...


@runtime_checkable
class ReplyInbox(Protocol):
    """One service instance's ephemeral inbox for replies, opened by a ``ReplyPath``.

    It is not durable and not a topic: no group, no lease, no ack. A reply that
    reaches it while nobody reads, or after ``aclose``, may be lost; its caller
    then gets ``RequestTimeoutError`` (request-reply already promises no more).
    """

    @property
    def address(self) -> str:
        """What goes in a request's ``replyto`` now (``ReplyPath.is_direct_address`` is true
        for it). It changes only after the inbox lost its server-side object and opened a
        new one; the old address is then reported to the inbox's ``on_lost``."""
        ...

    def __aiter__(self) -> AsyncIterator[WireMessage]:
        """The replies, as they arrive, until ``aclose``; iterate once. A lost connection
        pauses the iteration, which resumes by itself once the server answers again."""
        ...

    async def aclose(self) -> None:
        """Stop reading and remove the inbox from the server; safe to call twice."""
        ...


@runtime_checkable
class ReplyPath(Protocol):
    """Replies sent straight to the caller's inbox, beside the topic contract.

    A request-reply round trip on the topic contract pays for a consumer group,
    leases and acks on the reply topic; a reply needs none of them, as its
    caller waits against a deadline and drops late or duplicate replies anyway.
    """

    async def open_reply_inbox(
        self, owner: str, *, on_lost: Callable[[str], None] | None = None
    ) -> ReplyInbox:
        """Open an inbox on the server for ``owner`` (a name shown in server-side names).

        ``on_lost(address)`` is called when the inbox's server-side object is gone for
        good (the address is then replaced): replies sent to ``address`` cannot arrive.

        Raises:
            BrokerUnavailableError: the server cannot be reached; nothing was left on it.
            BrokerClosedError: the broker was closed.
        """
        ...

    def is_direct_address(self, replyto: str) -> bool:
        """Whether ``replyto`` is an inbox address of this backend (not a topic name)."""
        ...

    async def send_reply(self, replyto: str, message: WireMessage) -> None:
        """Send ``message`` to the inbox at ``replyto``; fire and forget, as a reply is.

        A reply to an inbox that no longer exists is dropped without an error and
        without leaving anything behind on the server.

        Raises:
            ConfigurationError: ``replyto`` is not an inbox address of this backend.
            MessageTooLargeError: over the broker's ``max_message_bytes``.
            BrokerUnavailableError: not sent; the caller's request will time out.
        """
        ...


@runtime_checkable
class DirectReplies(Protocol):
    """A backend with a direct reply path (Redis, RabbitMQ, NATS).

    Memory and SQLite have none: their reply topic already costs a few
    microseconds (memory) or one shared commit (SQLite), and a second path would
    only add code, so request-reply there keeps the topic contract.
    """

    def direct_replies(self) -> ReplyPath:
        """This broker's reply path (one object per broker, made on first use)."""
        ...


#: Where a request carries its deadline: the CloudEvents ``deadline`` extension, in binary mode.
DEADLINE_HEADER = "ce-deadline"


def seconds_left(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds until the message's own deadline (negative once passed), or None if it has
    none that can be read: a request's deadline bounds how long its publish waits its turn."""
    raw = headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        deadline = datetime.fromisoformat(unquote(raw))
    except ValueError:
        return None
    if deadline.tzinfo is None:
        return None  # not ours (wirework writes UTC offsets): ignored, as a malformed one is
    return (deadline - now).total_seconds()
