"""A delivery of the NATS backend, and how it settles (ack, nack, dead-letter).

JetStream would accept an ack from a delivery whose lease ran out and remove
the copy another consumer now holds, so the lease is kept here too: a delivery
holds its message until ``deadline`` (its lease less a margin for the trip to
the server), and a settle after that, or after its subscription handed it back,
is *stale* and has no effect. An ack sent just before the margin can still
arrive after a redelivery; that race is JetStream's own (its consumer docs warn
of it), and it can only cause a duplicate, never a loss.

Settling a keyed message moves the key's cursor before the JetStream ack, so a
crash between the two leaves a redelivery that the reader recognises (at or
below the cursor) and acks unseen. Its state record goes before the ack too.

An ack is a plain publish, as RabbitMQ's ``basic.ack`` is a frame without an
answer, and the acks of one turn of the event loop share a socket write on the
next (``ACK_DELAY`` later right after a direct reply; at once near the lease's
end): ``ack`` fails (BrokerError) when the connection is down, and an ack lost
with a connection that drops before the server read it means one redelivery,
a duplicate, never a loss. Only the ack after a dead letter waits for the
server's answer (JetStream's AckSync), so that a ``dead_letter`` that returned
means the message will not come back beside its record; that path is rare.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from wirework.brokers.base import DeadLetter, DeadLetterReason, Delivery, Failure
from wirework.brokers.nats_client import ACK_DELAY
from wirework.brokers.nats_state import Cursor, MessageState
from wirework.envelope import WireMessage
from wirework.errors import AlreadySettledError, BrokerError, ConfigurationError

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsBroker


#: An ack is written at once, not queued, when its lease has less than this left.
_ACK_LEEWAY = 4 * ACK_DELAY


@dataclass(frozen=True)
class Group:
    """The durable consumer a subscription reads: its stream, name, lease and start."""

    topic: str
    name: str
    stream: str
    consumer: str
    lease: float
    start: int
    """First stream sequence of a ``latest`` group (0: from the beginning)."""


@dataclass(eq=False)
class Pending:
    """A message JetStream delivered to a reader that has not been handed out yet."""

    reply: str
    seq: int
    delivered: int
    message: WireMessage
    key: str | None
    token: str
    not_before: float | None
    touched: float
    """When its lease last (re)started on the server: delivery or in-progress ack."""
    foreign: bool = False
    """A replay addressed to another group: acked and skipped."""
    state: MessageState | None = None
    cursor: Cursor = field(default_factory=Cursor)


class Holder(Protocol):
    """What a delivery needs from the reader that handed it out."""

    broker: NatsBroker
    group: Group

    def forget(self, delivery: NatsDelivery) -> None: ...


def nak_payload(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()


class NatsDelivery(Delivery):
    """A delivery of the NATS backend: a JetStream message held under a lease."""

    def __init__(self, holder: Holder, pending: Pending, deadline: float) -> None:
        state = pending.state or MessageState()
        self.message = pending.message
        self.topic = holder.group.topic
        self.group = holder.group.name
        self.key = pending.key
        self.attempt = max(1, pending.delivered - state.waits)
        self.first_failure_at = state.first_failure_at
        self.pending = pending
        self.deadline = deadline
        self.released = False
        """Handed back by its subscription: a later settle is stale."""
        self._holder = holder
        self._group = holder.group
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def holding(self, now: float) -> bool:
        """Whether it still holds its message (and counts against prefetch)."""
        return not self._settled and not self.released and now < self.deadline

    def _claim(self) -> bool:
        """Mark settled; True if this delivery still holds its message, False if stale."""
        if self._settled:
            raise AlreadySettledError(
                f"delivery of {self.message.message_id!r} on {self.topic}/{self.group} "
                f"was already settled"
            )
        broker = self._holder.broker
        broker.check_open()
        self._settled = True
        self._holder.forget(self)
        if self.released or broker.clock.monotonic() >= self.deadline:
            broker.stale_settles += 1
            return False
        return True

    async def ack(self) -> None:
        if self._claim():
            await self._finish(None)

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        if not delay >= 0:  # also refuses NaN
            raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")
        if not self._claim():
            return
        broker, pending = self._holder.broker, self.pending
        state = pending.state or MessageState()
        updated = state
        if error is not None:
            first = state.first_failure_at or broker.clock.now()
            updated = replace(updated, first_failure_at=first, last_error=error)
        due = broker.clock.now().timestamp() + delay if delay > 0 else None
        updated = replace(updated, due=due)
        if updated != state:
            group = self._group
            await broker.stores.save_state(group.topic, group.name, pending.seq, updated)
        await broker.connection.publish(pending.reply, nak_payload(delay))

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        if self._claim():
            await self._finish((reason, error))

    async def _finish(self, dead: tuple[DeadLetterReason, Failure | None] | None) -> None:
        """Ack, or dead-letter then ack: cursor and state first, the JetStream ack last."""
        broker, pending, group = self._holder.broker, self.pending, self._group
        state = pending.state or MessageState()
        if dead is not None:
            reason, error = dead
            now = broker.clock.now()
            record = DeadLetter(
                id="",
                topic=group.topic,
                group=group.name,
                message_id=pending.message.message_id,
                reason=reason,
                attempts=self.attempt,
                first_failure_at=state.first_failure_at or now,
                last_failure_at=now,
                dead_lettered_at=now,
                error=error or state.last_error,
                message=pending.message,
                key=pending.key,
            )
            await broker.stores.add_dead_letter(
                record,
                msg_id=f"dl:{group.stream}:{group.consumer}:{pending.seq}",
                max_payload=await broker.max_payload(),
            )
        if pending.key is not None:
            await broker.stores.advance(
                group.topic, group.name, pending.token, pending.seq, pending.cursor
            )
        await broker.stores.drop_state(state)
        connection = broker.connection
        if dead is None:
            if self.deadline - broker.clock.monotonic() > _ACK_LEEWAY:
                connection.ack(pending.reply)  # written on the event loop's next turn
            else:
                await connection.publish(pending.reply, b"+ACK")  # no time to wait for company
        else:
            # Answered (AckSync): once it returns, the message cannot come back beside its
            # dead-letter record.
            with connection.translate(f"acking a message of {group.topic}/{group.name}"):
                await connection.request(pending.reply, b"+ACK")
        if pending.key is not None:
            # Readers parking later messages of this key look again at once.
            with contextlib.suppress(BrokerError):
                notify = broker.names.notify_subject(group.topic, group.name)
                await connection.publish(notify, pending.token.encode())
