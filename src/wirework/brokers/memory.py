"""The in-process broker: the reference implementation of the broker contract.

Everything lives in plain dictionaries owned by one event loop, so there is
no locking and no I/O, and the code can say exactly what every backend must
do; the conformance suite runs against it first. Nothing survives the
process, so it is for tests and for single-process use, never for work that
must outlive a crash.

The model, the same one the SQLite backend stores in tables:

* A topic keeps each published message (with a broker-wide increasing
  sequence) while any group still holds a copy of it, or while the topic has
  no group yet. A group created with ``start="earliest"`` takes a copy of
  every message the topic still keeps; a ``latest`` group takes only what is
  published after it, and its creation drops the messages kept for no group.
* Each group has its own copy-state of each message: when it is due, who holds
  it and until when (the lease), how often it was delivered, and its failures.
  An ack or dead-letter removes the group's copy; the message itself goes
  when the last copy does, so nothing grows without bound.
* Within a group a message with key K is handed out only when no earlier
  message with key K is still held by the group (ready, delayed or in
  flight); other keys and keyless messages go past it.

A settle from a delivery that no longer holds its message (its lease ran out
and the message was handed out again, or its subscription was left) is
*stale*: it is ignored and returns, so a slow consumer can never remove the
delivery a newer consumer is working on. ``MemoryBroker.stale_settles``
counts them. A settle after the lease ran out but before anyone took the
message over still counts, as nothing has been handed out twice yet.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.brokers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Broker,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    Delivery,
    Failure,
    GroupAdmin,
    GroupStats,
    Inspectable,
    Subscription,
    check_name,
)
from wirework.clock import SYSTEM_CLOCK, Clock, wait_first
from wirework.envelope import WireMessage
from wirework.errors import (
    AlreadySettledError,
    BrokerClosedError,
    ConfigurationError,
    DeadLetterNotFoundError,
    QueueFullError,
)

#: Times within this many seconds count as reached: ``now + (due - now)`` may
#: miss ``due`` by a rounding step, which would leave a waiter a sleep of 1e-16 s
#: that a manual clock never ends.
_TIME_SLACK = 1e-9


class MemorySettings(BaseSettings):
    """Options of ``memory://`` (query string, keyword or ``WIREWORK_MEMORY_*``)."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_MEMORY_", extra="forbid")

    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    """Largest message ``publish`` accepts, headers included."""
    max_queue_length: int | None = Field(default=None, gt=0)
    """Messages a topic may keep (not yet settled by every group) before publish is refused."""


@dataclass(eq=False)
class _Stored:
    """A message kept by a topic, for as long as a group holds a copy of it."""

    seq: int
    message: WireMessage
    key: str | None
    due: float
    holders: int = 0
    only_group: str | None = None
    """Set on a replayed message: it belongs to that group alone, new groups skip it."""


@dataclass(eq=False)
class _Copy:
    """One group's state of one stored message."""

    stored: _Stored
    due: float
    deliveries: int = 0
    holder: MemoryDelivery | None = None
    lease_until: float = 0.0
    first_failure_at: datetime | None = None
    last_error: Failure | None = None

    def held(self, now: float) -> bool:
        return self.holder is not None and self.lease_until > now + _TIME_SLACK

    def available(self, now: float) -> bool:
        return not self.held(now) and self.due <= now + _TIME_SLACK


class _Group:
    """A consumer group of one topic: its copies in publish order, and a change signal."""

    def __init__(self, topic: str, name: str) -> None:
        self.topic = topic
        self.name = name
        self.copies: dict[int, _Copy] = {}
        self.changed = asyncio.Event()

    def notify(self) -> None:
        """Wake every consumer waiting on this group; later waiters get a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()

    def add(self, stored: _Stored) -> None:
        self.copies[stored.seq] = _Copy(stored=stored, due=stored.due)
        stored.holders += 1
        self.notify()

    def take(self, now: float) -> _Copy | None:
        """The first copy that may be handed out now, in publish order, honouring keys.

        A linear scan: it stops at the first available copy, so it reads past
        only what is in flight, delayed or waiting behind its key.
        """
        busy_keys: set[str] = set()
        for copy in self.copies.values():
            key = copy.stored.key
            if key is not None and key in busy_keys:
                continue
            if copy.available(now):
                return copy
            if key is not None:
                busy_keys.add(key)
        return None

    def next_change(self, now: float) -> float | None:
        """Seconds until a delayed copy falls due or a lease runs out; None if never."""
        times = [c.lease_until if c.holder is not None else c.due for c in self.copies.values()]
        future = [t for t in times if t > now + _TIME_SLACK]
        return min(future) - now if future else None


class _Topic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: dict[int, _Stored] = {}
        self.groups: dict[str, _Group] = {}


class MemoryDelivery(Delivery):
    """A delivery of the in-process broker; it settles by changing its group's copy."""

    def __init__(self, broker: MemoryBroker, group: _Group, copy: _Copy) -> None:
        self.message = copy.stored.message
        self.topic = group.topic
        self.group = group.name
        self.key = copy.stored.key
        self.attempt = copy.deliveries
        self.first_failure_at = copy.first_failure_at
        self._broker = broker
        self._state = group
        self._copy = copy
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def holding(self, now: float) -> bool:
        """Whether this delivery still counts against its subscription's prefetch."""
        return not self._settled and self._copy.holder is self and self._copy.held(now)

    def release(self) -> None:
        """Hand the message back to the group at once (the subscription was left)."""
        if not self._settled and self._copy.holder is self:
            self._copy.holder = None
            self._state.notify()

    def _claim(self) -> bool:
        """Mark settled; True if this delivery still holds the message, False if stale."""
        if self._settled:
            raise AlreadySettledError(
                f"delivery of {self.message.message_id!r} on {self.topic}/{self.group} "
                f"was already settled"
            )
        self._broker._check_open()
        self._settled = True
        if self._copy.holder is not self:
            self._broker.stale_settles += 1
            return False
        return True

    async def ack(self) -> None:
        if self._claim():
            self._broker._remove(self._state, self._copy)

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        _check_delay(delay)
        if not self._claim():
            return
        copy = self._copy
        if error is not None:
            copy.first_failure_at = copy.first_failure_at or self._broker.clock.now()
            copy.last_error = error
        copy.holder = None
        copy.due = self._broker.clock.monotonic() + delay
        self._state.notify()

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        if not self._claim():
            return
        now = self._broker.clock.now()
        record = DeadLetter(
            id=uuid.uuid4().hex,
            topic=self.topic,
            group=self.group,
            message_id=self.message.message_id,
            reason=reason,
            attempts=self.attempt,
            first_failure_at=self._copy.first_failure_at or now,
            last_failure_at=now,
            dead_lettered_at=now,
            error=error or self._copy.last_error,
            message=self.message,
            key=self.key,
        )
        self._broker._dead[record.id] = record
        self._broker._remove(self._state, self._copy)


class MemoryBroker(Broker, DeadLetterStore, Inspectable, GroupAdmin):
    """The broker contract in process memory; open with ``connect("memory://")``.

    Attributes:
        stale_settles: settles ignored because the delivery no longer held its
            message (lease ran out and someone else took it, or it was released).
    """

    def __init__(
        self, *, settings: MemorySettings | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings or MemorySettings()
        self.max_message_bytes = self.settings.max_message_bytes
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.stale_settles = 0
        self._dead: dict[str, DeadLetter] = {}
        """Dead letters by id, oldest first (dicts keep insertion order)."""
        self._topics: dict[str, _Topic] = {}
        self._seq = itertools.count(1)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError("the memory broker was closed")

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        await _checkpoint()
        self._check_open()
        check_name("topic", topic)
        self.check_size(topic, message)
        _check_delay(delay)
        state = self._topics.get(topic)
        limit = self.settings.max_queue_length
        if state is not None and limit is not None and len(state.messages) >= limit:
            raise QueueFullError(
                f"topic {topic!r} keeps {limit} messages not yet settled by every group "
                f"(max_queue_length); consume faster or raise the limit"
            )
        state = state or self._topics.setdefault(topic, _Topic(topic))
        stored = _Stored(next(self._seq), message, key, self.clock.monotonic() + delay)
        state.messages[stored.seq] = stored
        for group in state.groups.values():
            group.add(stored)

    def subscribe(self, subscription: Subscription) -> AsyncGenerator[MemoryDelivery, None]:
        """Deliveries for one consumer of the group, as an async generator.

        Its unsettled deliveries go back to the group when it finishes; after a
        plain ``break`` that is when the loop finalizes the generator, so wrap it
        in ``contextlib.aclosing`` to hand them back at the ``break`` itself.

        Raises:
            BrokerClosedError: the broker was closed.
        """
        self._check_open()
        return self._deliveries(subscription)

    async def _deliveries(self, subscription: Subscription) -> AsyncGenerator[MemoryDelivery, None]:
        self._check_open()
        group = self._join(subscription)
        held: list[MemoryDelivery] = []
        try:
            while True:
                await _checkpoint()
                if self._closed:
                    return
                changed = group.changed  # taken before looking, so no change is missed
                now = self.clock.monotonic()
                held = [d for d in held if d.holding(now)]
                copy = group.take(now) if len(held) < subscription.prefetch else None
                if copy is None:
                    await self._wait(changed, group.next_change(now))
                    continue
                copy.deliveries += 1
                delivery = MemoryDelivery(self, group, copy)
                copy.holder = delivery
                copy.lease_until = now + subscription.lease_timeout
                held.append(delivery)
                yield delivery
        finally:
            for delivery in held:
                delivery.release()

    def _join(self, subscription: Subscription) -> _Group:
        """The subscription's group, created on first use at its start position."""
        topic = self._topics.setdefault(subscription.topic, _Topic(subscription.topic))
        group = topic.groups.get(subscription.group)
        if group is not None:
            return group
        group = topic.groups[subscription.group] = _Group(topic.name, subscription.group)
        if subscription.start == "earliest":
            for stored in topic.messages.values():
                if stored.only_group is None:
                    group.add(stored)
        else:
            for seq in [seq for seq, s in topic.messages.items() if s.holders == 0]:
                del topic.messages[seq]
        return group

    async def _wait(self, changed: asyncio.Event, seconds: float | None) -> None:
        """Sleep until the group changes or ``seconds`` pass on the broker's clock."""
        await wait_first(changed, clock=self.clock, pause=seconds)

    def _remove(self, group: _Group, copy: _Copy) -> None:
        """Drop a group's copy for good, and the message once no group holds it."""
        del group.copies[copy.stored.seq]
        copy.holder = None
        copy.stored.holders -= 1
        if copy.stored.holders == 0:
            del self._topics[group.topic].messages[copy.stored.seq]
        group.notify()

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group now, at its start position, as ``subscribe`` would on first use."""
        self._check_open()
        self._join(subscription)

    async def delete_group(self, topic: str, group: str) -> None:
        """Forget a group and its copies; a topic left with no group is forgotten too."""
        self._check_open()
        state = self._topics.get(topic)
        if state is None or group not in state.groups:
            return
        gone = state.groups.pop(group)
        for copy in list(gone.copies.values()):
            copy.holder = None
            copy.stored.holders -= 1
            if copy.stored.holders == 0:
                state.messages.pop(copy.stored.seq, None)
        gone.copies.clear()
        gone.notify()
        if not state.groups:
            del self._topics[topic]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for topic in self._topics.values():
            for group in topic.groups.values():
                group.notify()

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        self._check_open()
        matches = (
            record
            for record in self._dead.values()
            if (topic is None or record.topic == topic)
            and (group is None or record.group == group)
            and (reason is None or record.reason == reason)
        )
        return list(itertools.islice(matches, max(0, limit)))

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        self._check_open()
        try:
            return self._dead[dead_letter_id]
        except KeyError:
            raise DeadLetterNotFoundError(f"no dead letter with id {dead_letter_id!r}") from None

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        """Hand dead letters back to their group as new messages at the end of its queue.

        The replayed message keeps its id and key but gets a new sequence, so it
        queues behind what the group holds now; it does not count against
        ``max_queue_length``, as it was accepted once already.
        """
        self._check_open()
        records = [await self.dead_letter(i) for i in dict.fromkeys(dead_letter_ids)]
        now = self.clock.monotonic()
        for record in records:
            del self._dead[record.id]
            topic = self._topics[record.topic]
            stored = _Stored(
                next(self._seq), record.message, record.key, now, only_group=record.group
            )
            topic.messages[stored.seq] = stored
            topic.groups[record.group].add(stored)
        return len(records)

    async def stats(self) -> Sequence[GroupStats]:
        """One row per (topic, group), sorted; expired leases count as ready."""
        self._check_open()
        now = self.clock.monotonic()
        dead = Counter((record.topic, record.group) for record in self._dead.values())
        rows: list[GroupStats] = []
        for name, topic in sorted(self._topics.items()):
            if not topic.groups:
                ready = sum(1 for s in topic.messages.values() if s.due <= now + _TIME_SLACK)
                delayed = len(topic.messages) - ready
                rows.append(
                    GroupStats(
                        topic=name,
                        group=None,
                        ready=ready,
                        delayed=delayed,
                        in_flight=0,
                        dead_lettered=0,
                    )
                )
            for group_name, group in sorted(topic.groups.items()):
                copies = group.copies.values()
                in_flight = sum(1 for c in copies if c.held(now))
                ready = sum(1 for c in copies if c.available(now))
                rows.append(
                    GroupStats(
                        topic=name,
                        group=group_name,
                        ready=ready,
                        delayed=len(group.copies) - ready - in_flight,
                        in_flight=in_flight,
                        dead_lettered=dead[(name, group_name)],
                    )
                )
        return rows


def _check_delay(delay: float) -> None:
    if not delay >= 0:  # also refuses NaN
        raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")


async def _checkpoint() -> None:
    """Let other tasks run, as a real broker's I/O would.

    Without it a busy consumer (or producer) of this broker never suspends,
    and starves every other task of the loop, which no network backend does.
    """
    await asyncio.sleep(0)
