"""One subscription of the RabbitMQ backend: prefetch, per-key order, leases, settling.

A subscription has a channel of its own with one consumer on each of its
group's queues: the keyless queue, shared round-robin by every subscription
of the group, and the partitions, each with a *single active consumer*, so all
messages of a key reach one subscription at a time. Deliveries land in a local
buffer in arrival order, and are handed out the way the memory broker does
it: at most ``prefetch`` held at once, and a keyed message only once no
earlier message of its key is held (other keys and keyless messages go past).

RabbitMQ has no lease while a channel stays open, so one is built here:

* a keyless delivery whose lease runs out is *superseded*: a copy (attempt
  counted) is published to the back of its queue, where any consumer of the
  group takes it. The original stays unacked, so RabbitMQ gives this
  subscription nothing new while nobody asks it for more (a stuck consumer
  must not catch the copy, or anything else); it is acked, freeing the slot,
  as soon as the subscription is asked for its next delivery, or left;
* a keyed delivery whose lease runs out is handed out again by this same
  subscription (its partition has no other active consumer to give it to),
  ahead of later messages of its key.

A settle that no longer holds its message (superseded, re-handed, or its
subscription left) has no effect and returns; one whose connection was lost
raises ``BrokerUnavailableError``, as the broker hands the message out again.
nack and dead_letter publish (with confirms) a copy or a record *before*
acking the original, so a crash in between duplicates and never loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiormq.abc import AbstractChannel, DeliveredMessage

from wirework.brokers.base import DeadLetter, DeadLetterReason, Delivery, Failure, Subscription
from wirework.brokers.rabbitmq_link import (
    AMQP_ERRORS,
    CONNECTION_ERRORS,
    Link,
    amqp_errors,
)
from wirework.brokers.rabbitmq_names import (
    DELAY_HEADER,
    Meta,
    bucket_for,
    dead_letter_id,
    dead_letter_state,
    outgoing_headers,
    split_headers,
)
from wirework.brokers.rabbitmq_topology import MissingError, Mode, Topology, group_queues
from wirework.clock import Clock
from wirework.envelope import WireMessage
from wirework.errors import (
    AlreadySettledError,
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
)

if TYPE_CHECKING:
    from wirework.brokers.rabbitmq import RabbitSettings

log = logging.getLogger("wirework.brokers.rabbitmq")

T = TypeVar("T")

#: The state of a message published without a key and not yet retried (no state table).
_PLAIN = Meta()


class Host(Protocol):
    """What a subscription needs of its broker."""

    closed: bool
    clock: Clock
    link: Link
    topology: Topology
    settings: RabbitSettings
    stale_settles: int

    @property
    def internal_mode(self) -> Mode: ...

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]: ...

    async def shielded(self, work: Coroutine[Any, Any, T]) -> T: ...


@dataclass(eq=False, slots=True)
class _Lot:
    """One AMQP delivery on one channel, and what this subscription did with it."""

    seq: int
    channel: AbstractChannel
    tag: int
    queue: str
    keyed: bool
    message: WireMessage
    meta: Meta
    returns: int
    """RabbitMQ's count of earlier returns of this copy (``x-delivery-count``)."""
    extra: int = 0
    """Times this subscription handed it out again after a keyed lease ran out."""
    holder: RabbitDelivery | None = None
    lease_until: float = 0.0
    superseding: bool = False
    superseded: bool = False
    returned: bool = False
    """Its channel closed under it: RabbitMQ took it back (connection lost)."""
    done: bool = False

    @property
    def attempt(self) -> int:
        return self.meta.attempts + self.returns + self.extra + 1


class RabbitDelivery(Delivery):
    """A delivery of the RabbitMQ backend; settles through its subscription."""

    def __init__(self, state: SubscriptionState, lot: _Lot) -> None:
        self.message = lot.message
        self.topic = state.subscription.topic
        self.group = state.subscription.group
        self.key = lot.meta.key
        self.attempt = lot.attempt
        self.first_failure_at = lot.meta.first_failure_at
        self._state = state
        self._lot = lot
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _claim(self) -> _Lot | None:
        """Mark settled; the lot if this delivery still holds its message, None if stale.

        Raises:
            AlreadySettledError, BrokerClosedError: as the contract says.
            BrokerUnavailableError: the connection was lost meanwhile; RabbitMQ took the
                message back and delivers it again.
        """
        if self._settled:
            raise AlreadySettledError(
                f"delivery of {self.message.message_id!r} on {self.topic}/{self.group} "
                f"was already settled"
            )
        state = self._state
        if state.host.closed:
            raise BrokerClosedError("the RabbitMQ broker was closed")
        self._settled = True
        lot = self._lot
        if state.left or lot.holder is not self or lot.superseding or lot.superseded:
            state.host.stale_settles += 1  # no effect on the message, which is elsewhere now
            return None
        if lot.returned or lot.channel.is_closed:
            state.drop(lot)
            raise BrokerUnavailableError(
                f"the connection to RabbitMQ was lost while {self.message.message_id!r} was "
                f"held; it will be delivered again"
            )
        if lot.done:  # handed back already (its lease ran out and no copy could be made)
            state.host.stale_settles += 1
            return None
        return lot

    async def ack(self) -> None:
        lot = self._claim()
        if lot is not None:
            await self._state.finish(lot)

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        if not delay >= 0:  # also refuses NaN
            raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")
        bucket_for(delay)  # refuses a delay too long before anything changes
        lot = self._claim()
        if lot is None:
            return
        state = self._state
        meta = lot.meta.after_failure(self.attempt, error, state.host.clock.now())
        await state.settle_with(lot, lambda: state.send_copy(lot, meta, delay))

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        lot = self._claim()
        if lot is None:
            return
        state = self._state
        now = state.host.clock.now()
        record = DeadLetter(
            id=dead_letter_id(uuid.uuid4().hex, self.topic, self.group),
            topic=self.topic,
            group=self.group,
            message_id=self.message.message_id,
            reason=reason,
            attempts=self.attempt,
            first_failure_at=lot.meta.first_failure_at or now,
            last_failure_at=now,
            dead_lettered_at=now,
            error=error or lot.meta.last_error,
            message=self.message,
            key=self.key,
        )
        await state.settle_with(lot, lambda: state.store_dead_letter(record))


class SubscriptionState:
    """The local side of one subscription: its channel, buffer, held deliveries and leases."""

    def __init__(self, host: Host, subscription: Subscription) -> None:
        self.host = host
        self.subscription = subscription
        self.lots: dict[int, _Lot] = {}
        self.changed = asyncio.Event()
        self.channel: AbstractChannel | None = None
        self.joined = False
        self.left = False
        self._seq = itertools.count()
        self._copies: set[asyncio.Task[None]] = set()
        self._superseded: set[_Lot] = set()
        """Lots whose copies carry on, their originals still to be acked (``_release``)."""
        self._lease_timer: asyncio.TimerHandle | None = None
        """The one timer of the keyless leases, due when the oldest one runs out."""
        self._asked = 0
        """How many ``next`` calls are running: while none is, nothing superseded is acked."""
        self._unlisten = host.link.listen(self.notify)

    def notify(self) -> None:
        """Wake the waiting ``next``; later waiters get a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()

    # -- handing out -----------------------------------------------------------------

    async def next(self) -> RabbitDelivery | None:
        """The next delivery this subscription may hand out; None once the broker closed."""
        self._asked += 1
        try:
            if self._superseded:
                await self._release_superseded()
            return await self._next()
        finally:
            self._asked -= 1

    async def _next(self) -> RabbitDelivery | None:
        loop = asyncio.get_running_loop()
        while True:
            if self.host.closed:
                return None
            if self.channel is None or self.channel.is_closed:
                try:
                    await self._attach()
                except BrokerClosedError:
                    return None
                continue
            changed = self.changed
            now = loop.time()
            lot = self._take(now) if self.holding(now) < self.subscription.prefetch else None
            if lot is not None:
                return self._hand_out(lot, now)
            wake = self._next_change(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake):
                    await changed.wait()

    def _take(self, now: float) -> _Lot | None:
        """The first lot that may be handed out, in arrival order, honouring keys."""
        busy: set[str] = set()
        for lot in self.lots.values():
            if lot.superseding or lot.superseded:
                continue
            key = lot.meta.key if lot.keyed else None
            if key is not None and key in busy:
                continue
            if lot.holder is None or (lot.keyed and lot.lease_until <= now):
                return lot
            if key is not None:
                busy.add(key)
        return None

    def holding(self, now: float) -> int:
        """Deliveries held against ``prefetch``: handed out, unsettled, lease running."""
        # ``_held`` inlined: this runs for every delivery handed out, over every lot.
        return sum(
            1
            for lot in self.lots.values()
            if lot.holder is not None
            and not (lot.superseding or lot.superseded)
            and (not lot.keyed or lot.lease_until > now)
        )

    def ready(self, now: float) -> int:
        """Lots received (or re-handed) but waiting here: ready, for ``stats``."""
        return sum(
            1
            for lot in self.lots.values()
            if not (lot.superseding or lot.superseded) and not self._held(lot, now)
        )

    @staticmethod
    def _held(lot: _Lot, now: float) -> bool:
        if lot.holder is None or lot.superseding or lot.superseded:
            return False
        return not lot.keyed or lot.lease_until > now

    def _next_change(self, now: float) -> float | None:
        """Seconds until a keyed lease runs out (its lot can be handed out again); None if never."""
        leases = [
            lot.lease_until - now
            for lot in self.lots.values()
            if lot.keyed and self._held(lot, now)
        ]
        return min(leases) if leases else None

    def _hand_out(self, lot: _Lot, now: float) -> RabbitDelivery:
        if lot.holder is not None:
            lot.extra += 1  # a keyed lease ran out: this is a redelivery
        delivery = RabbitDelivery(self, lot)
        lot.holder = delivery
        lot.lease_until = now + self.subscription.lease_timeout
        if not lot.keyed and self._lease_timer is None:
            self._arm(lot.lease_until)
        return delivery

    def _arm(self, when: float) -> None:
        self._lease_timer = asyncio.get_running_loop().call_at(when, self._check_leases)

    def _check_leases(self) -> None:
        """Expire the keyless leases that ran out; arm the timer for the next to run out.

        One timer per subscription instead of one per delivery (each armed, then
        cancelled by the ack a few milliseconds later): every keyless lease is
        ``lease_timeout`` long, so the oldest held one runs out first, and in a
        steady flow this wakes about once per ``lease_timeout``, scanning the
        lots (at most about ``prefetch``) once.
        """
        self._lease_timer = None
        if self.left:
            return
        now = asyncio.get_running_loop().time()
        soonest: float | None = None
        for lot in list(self.lots.values()):
            delivery = lot.holder
            if lot.keyed or delivery is None or lot.done or lot.superseding or lot.superseded:
                continue
            if delivery.settled:
                continue
            if lot.lease_until <= now:
                self._expired(lot, delivery)
            elif soonest is None or lot.lease_until < soonest:
                soonest = lot.lease_until
        if soonest is not None:
            self._arm(soonest)

    # -- the channel ------------------------------------------------------------------

    async def _attach(self) -> None:
        """Declare the group, settle the topic's held messages once, and start consuming.

        The work runs shielded: a subscription left (cancelled) half-way through
        must not cancel AMQP calls half-way; the channel it opened is closed then.
        """
        host = self.host
        wait = self.joined or host.settings.on_disconnect == "wait"
        try:
            channel = await host.shielded(self._open(wait))
        except (BrokerClosedError, ConfigurationError):
            raise
        except BrokerUnavailableError:
            if not wait:
                raise
            # An outage (or a queue deleted under us): try again after a pause.
            host.topology.forget()
            await asyncio.sleep(host.settings.reconnect_initial_backoff)
            return
        if channel is None:
            return
        self.joined = True
        channel.closing.add_done_callback(lambda _: self._closed_channel(channel))

    async def _open(self, wait: bool) -> AbstractChannel | None:
        host, sub = self.host, self.subscription
        new = await host.topology.ensure_group(sub.topic, sub.group, Mode(wait, None))
        if not self.joined:
            mode = Mode(wait, host.settings.publish_timeout)
            await host.topology.adopt_held(sub.topic, sub.group, sub.start, new, mode)
        connection = await host.link.connected(wait=wait, timeout=None)
        with amqp_errors(f"subscribing to {sub.topic}/{sub.group}", host.link.url):
            channel = await connection.channel(publisher_confirms=False)
            if self.left:
                await self.host.link.close_channel(channel)
                return None
            self.channel = channel  # before consuming: deliveries may arrive at once
            try:
                await self._consume(channel)
            except BaseException:
                self.channel = None
                await self.host.link.close_channel(channel)
                raise
        if self.left:  # left while this ran: hand back what arrived
            self.channel = None
            await self.host.link.close_channel(channel)
            return None
        return channel

    async def _consume(self, channel: AbstractChannel) -> None:
        sub = self.subscription
        await channel.basic_qos(prefetch_count=sub.prefetch)
        channel.on_consumer_cancel_callbacks.add(lambda _: self._cancelled(channel))
        names = self.host.topology.names
        queues = group_queues(names, sub.topic, sub.group, self.host.settings.partitions)
        for queue in queues:
            keyed = queue != queues[0]

            async def on_message(
                message: DeliveredMessage, queue: str = queue, keyed: bool = keyed
            ) -> None:
                self._received(channel, queue, keyed, message)

            await channel.basic_consume(queue, on_message)

    def _received(
        self, channel: AbstractChannel, queue: str, keyed: bool, message: DeliveredMessage
    ) -> None:
        if self.left or channel is not self.channel or message.delivery_tag is None:
            return  # an old channel: the broker hands the message back when it closes
        user, state, returns = split_headers(message.header.properties.headers)
        meta = _PLAIN
        if state:  # a first copy without a key has no state table
            # Not written by wirework if it cannot be read: deliver it as a plain message.
            with contextlib.suppress(KeyError, TypeError, ValueError):
                meta = Meta.from_table(state)
        if returns == 0 and message.redelivered:
            returns = 1  # a classic queue says only "redelivered", not how often
        seq = next(self._seq)
        wire = WireMessage(headers=user.headers, body=message.body)
        self.lots[seq] = _Lot(seq, channel, message.delivery_tag, queue, keyed, wire, meta, returns)
        self.notify()

    def _closed_channel(self, channel: AbstractChannel) -> None:
        """The broker took back everything the channel held: forget it, attach again."""
        for lot in [lot for lot in self.lots.values() if lot.channel is channel]:
            lot.returned = True
            self.drop(lot)
        if self.channel is channel:
            self.channel = None
        self.notify()

    def _cancelled(self, channel: AbstractChannel) -> None:
        """The broker cancelled a consumer (its queue was deleted): start over."""
        self.host.topology.forget()
        self.host.spawn(self.host.link.close_channel(channel))

    # -- settling -----------------------------------------------------------------------

    def drop(self, lot: _Lot) -> None:
        lot.done = True
        self._superseded.discard(lot)
        self.lots.pop(lot.seq, None)
        self.notify()

    async def finish(self, lot: _Lot) -> None:
        """Ack ``lot`` for good."""
        try:
            await lot.channel.basic_ack(lot.tag)
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(
                f"the ack of {lot.message.message_id!r} was not recorded (connection lost); "
                f"the message will be delivered again"
            ) from exc
        finally:
            self.drop(lot)

    async def settle_with(self, lot: _Lot, store: Callable[[], Awaitable[None]]) -> None:
        """Store the copy or record first, then ack; if storing fails, hand the message back."""
        try:
            await store()
        except BrokerError:
            await self._requeue(lot)
            raise
        await self.finish(lot)

    async def _requeue(self, lot: _Lot) -> None:
        with contextlib.suppress(*AMQP_ERRORS):
            await lot.channel.basic_nack(lot.tag, requeue=True)
        self.drop(lot)

    async def _release_superseded(self) -> None:
        """Ack the originals whose copies carry on: the subscription asks for more now."""
        for lot in list(self._superseded):
            await self._ack_quietly(lot)

    async def _ack_quietly(self, lot: _Lot) -> None:
        with contextlib.suppress(*AMQP_ERRORS):
            if not lot.channel.is_closed:
                await lot.channel.basic_ack(lot.tag)
        self.drop(lot)

    async def _retrying(self, send: Callable[[], Awaitable[None]]) -> None:
        """``send``, once more after declaring again if a queue it needs went missing."""
        try:
            await send()
        except MissingError:
            self.host.topology.forget()
            sub = self.subscription
            await self.host.topology.ensure_group(sub.topic, sub.group, self.host.internal_mode)
            await send()

    async def send_copy(self, lot: _Lot, meta: Meta, delay: float) -> None:
        """Publish a copy of ``lot`` with ``meta`` to its own queue, now or after ``delay``."""
        host, sub = self.host, self.subscription
        topology, mode = host.topology, host.internal_mode

        async def send() -> None:
            headers = outgoing_headers(lot.message, meta.table())
            if delay <= 0:
                await topology.send("", lot.queue, lot.message.body, headers, mode)
                return
            bucket = await topology.ensure_bucket(sub.topic, sub.group, bucket_for(delay), mode)
            headers[DELAY_HEADER] = bucket
            exchange = topology.names.delay_exchange
            await topology.send(exchange, lot.queue, lot.message.body, headers, mode)

        await self._retrying(send)

    async def store_dead_letter(self, record: DeadLetter) -> None:
        topology = self.host.topology
        queue = topology.names.dead(record.topic, record.group)
        headers = outgoing_headers(record.message, dead_letter_state(record))

        async def send() -> None:
            await topology.send("", queue, record.message.body, headers, self.host.internal_mode)

        await self._retrying(send)

    # -- leases ------------------------------------------------------------------------

    def _expired(self, lot: _Lot, delivery: RabbitDelivery) -> None:
        if lot.holder is not delivery or lot.done or delivery.settled or self.left:
            return
        lot.superseding = True
        self.notify()  # the slot is free
        task = self.host.spawn(self._supersede(lot, delivery))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _supersede(self, lot: _Lot, delivery: RabbitDelivery) -> None:
        """Publish the copy another consumer takes; ack the original once no one holds it."""
        try:
            await self.send_copy(lot, replace(lot.meta, attempts=delivery.attempt), 0.0)
        except BrokerError as exc:
            log.warning("lease of %r ran out; handing it back: %s", lot.message.message_id, exc)
            lot.superseding = False
            await self._requeue(lot)
            return
        lot.superseding = False
        lot.superseded = True
        if not lot.done:
            self._superseded.add(lot)
        if self._asked or self.left:
            await self._ack_quietly(lot)

    # -- leaving -------------------------------------------------------------------------

    async def leave(self) -> None:
        """Hand back at once all this subscription holds, by closing its channel."""
        if self.left:
            return
        self.left = True
        self._unlisten()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        if self._copies:  # let copies in flight land, so their originals are acked, not returned
            await asyncio.wait(set(self._copies), timeout=self.host.settings.publish_timeout)
        for lot in [lot for lot in self.lots.values() if lot.superseded]:
            await self._ack_quietly(lot)
        channel, self.channel = self.channel, None
        if channel is not None:
            await self.host.link.close_channel(channel)
        self.lots.clear()
        self.notify()
