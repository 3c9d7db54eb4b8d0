"""One subscription of the NATS backend: pull on demand, sort, hold back, hand out.

A ``Reader`` belongs to one iteration of ``NatsBroker.subscribe``. Its task
(owned by the reader, stopped with it) pulls from the group's durable consumer
with one long poll at a time, a pull request that the server fills as messages
arrive until its batch is complete or ``PULL_EXPIRES`` passed. While messages
flow, the batch is as large as there is room for (``prefetch`` less what the
subscription holds and buffers), so a steady flow costs one pull request per
batch, not one per message, and a message published while a pull is open is
pushed at once. When a pull found nothing, the next asks for one message:
an idle subscription, or one just left, holds at most one open request on the
server (one that JetStream may still fill after the subscription left; that
message is handed back). The first pull waits for the iteration to ask, so a
subscription that is never iterated takes nothing; later ones are sent while
the iteration keeps asking (as buffered messages are kept alive, below), and
while messages are buffered, only once there is room for half a batch.

Each delivered message is sorted:

* addressed to another group (a replay): acked and skipped;
* published with a delay that has not passed: handed back with a ``nak``
  delayed to its time, recorded as a *wait*, which is not an attempt;
* keyed, and not the first unsettled message of its key in the group: *parked*
  here (its lease kept alive with in-progress acks) until the key's cursor
  moves; when ``prefetch`` messages are parked, further ones are handed back
  with a short delay instead, so a hot key never blocks other keys;
* otherwise ready, handed out in arrival order.

A message of key K is the first unsettled one of K in the group when no
message with key K lies between the key's cursor (the last settled one; see
``nats_state``) and it. Where the cursor expired or never existed, the group's
ack floor (everything at or below it is settled) or its start sequence bounds
the search instead.

Buffered messages are kept alive only while the iteration keeps asking (within
a lease); a stuck consumer's buffer runs out like its held deliveries do, and
the messages go to other consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from wirework.brokers.base import Subscription
from wirework.brokers.nats_delivery import Group, NatsDelivery, Pending, nak_payload
from wirework.brokers.nats_state import MessageState
from wirework.brokers.nats_wire import H_NOT_BEFORE, decode_headers, parse_subject, read_key
from wirework.envelope import WireMessage
from wirework.errors import BrokerError

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsBroker

log = logging.getLogger("wirework.brokers.nats")

#: Seconds a pull request stays open on the server, filling as messages arrive.
PULL_EXPIRES = 5.0
_PULL_EXPIRES_NS = int(PULL_EXPIRES * 1e9)
#: Seconds between looks at a parked key when no settle notification came (a safety net).
RECHECK = 0.5
#: The shortest and longest hand-back delay of a keyed message with nowhere to park.
KEY_WAIT = (0.05, 1.0)

Verdict = Literal["ready", "wait", "settled"]


@dataclass(eq=False)
class _Pull:
    token: str
    remaining: int
    ends_at: float
    generation: int
    got: int = 0


class Reader:
    """Pulls for one subscription and holds what it pulled; see the module docstring."""

    def __init__(self, broker: NatsBroker, subscription: Subscription, group: Group) -> None:
        self.broker = broker
        self.subscription = subscription
        self.group = group
        self._conn = broker.connection
        self._stores = broker.stores
        self._ready: deque[Pending] = deque()
        self._parked: dict[str, list[Pending]] = {}
        self._in_hand: deque[Pending] = deque()
        self._held: set[NatsDelivery] = set()
        self._arrivals: asyncio.Queue[Msg] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._pull: _Pull | None = None
        self._idle = True
        self._demand = 0
        self._asked_at = -math.inf
        self._tokens = itertools.count(1)
        self._floor = 0
        self._floor_at = -1.0
        self._recheck_at = 0.0
        self._wake = asyncio.Event()
        self._has_ready = asyncio.Event()
        self._stopping = False
        self._orphaned = False
        self._consumer_gone = False
        self._task: asyncio.Task[None] | None = None
        self._inbox_sub: NatsSubscription | None = None
        self._notify_sub: NatsSubscription | None = None
        self._inbox = ""

    @property
    def margin(self) -> float:
        """Seconds a lease is cut short here, for the trip of a settle to the server."""
        return min(1.0, max(0.01, 0.05 * self.group.lease))

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        nc = await self._conn.client()
        self._inbox = nc.new_inbox()
        notify = self.broker.names.notify_subject(self.group.topic, self.group.name)
        with self._conn.translate("subscribing"):
            self._inbox_sub = await nc.subscribe(f"{self._inbox}.*", cb=self._arrived)
            self._notify_sub = await nc.subscribe(notify, cb=self._notified)
        self._conn.watchers.add(self._wake)
        self._task = asyncio.create_task(self._run(), name=f"wirework-nats-{self._inbox}")

    async def next(self) -> NatsDelivery | None:
        """The next delivery, or None once the reader was stopped (broker closed)."""
        self._demand += 1
        try:
            while not self._stopping:
                now = self.broker.clock.monotonic()
                self._asked_at = now
                while self._ready and self._ready[0].touched + self._lease_left() <= now:
                    self._ready.popleft()  # its lease ran out here: the server hands it out again
                if self._ready and self._count(now) < self.subscription.prefetch:
                    return await self._hand_out(self._ready.popleft())
                self._has_ready.clear()
                if self._pull is None:
                    self._wake.set()  # the reader may pull now; an open pull needs nothing
                # A held delivery whose lease runs out makes room, as a settle does.
                until = min((d.deadline for d in self._held), default=None)
                timeout = None if until is None or not self._ready else max(0.0, until - now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._has_ready.wait()
            return None
        finally:
            self._demand -= 1

    async def stop(self) -> None:
        """Stop pulling and hand back at once everything held, seen or not."""
        if self._stopping:
            return
        self._stopping = True
        self._has_ready.set()
        self._wake.set()
        self._conn.watchers.discard(self._wake)
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self._conn.settings.api_timeout * 2)
            if not self._task.done():  # stuck on the network: what it holds returns by lease
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        await self._unsubscribe()
        unseen = [*self._in_hand, *self._ready, *itertools.chain(*self._parked.values())]
        self._in_hand.clear()
        self._ready.clear()
        self._parked.clear()
        while not self._arrivals.empty():
            pending = self._unpack(self._arrivals.get_nowait())
            if pending is not None and not pending.foreign:
                unseen.append(pending)
        now = self.broker.clock.monotonic()
        held = [d.pending for d in self._held if d.holding(now)]
        for delivery in self._held:
            delivery.released = True
        self._held.clear()
        # Waits are recorded first, then every nak goes in stream order, as JetStream
        # hands messages out again in the order they came back.
        delays = await asyncio.gather(
            *(self._record_wait(p, due=None, delay=0.0) for p in unseen), return_exceptions=True
        )
        back = [(p, 0.0) for p in held]
        back += [(p, d) for p, d in zip(unseen, delays, strict=True) if isinstance(d, float)]
        try:
            for pending, delay in sorted(back, key=lambda item: item[0].seq):
                await self._conn.publish(pending.reply, nak_payload(delay))
        except BrokerError as exc:
            log.debug("handing back on %s/%s: %s", self.group.topic, self.group.name, exc)

    async def _unsubscribe(self) -> None:
        """Leave the inbox, unless a pull is outstanding: JetStream may still serve it
        (it queues pull requests), so the inbox stays until that pull's last answer,
        handing back whatever arrives (``_orphaned``)."""
        inbox, pull = self._inbox_sub, self._pull
        for sub in (self._notify_sub, inbox):
            if sub is None:
                continue
            with contextlib.suppress(Exception):
                if sub is inbox and pull is not None and self._conn.up:
                    self._orphaned = True
                    await sub.unsubscribe(limit=sub.delivered + pull.remaining + 1)
                else:
                    await sub.unsubscribe()

    def forget(self, delivery: NatsDelivery) -> None:
        """A held delivery was settled: it no longer counts against prefetch."""
        self._held.discard(delivery)
        if self._pull is None:
            self._wake.set()
        if self._ready:
            self._has_ready.set()

    # -- callbacks from nats-py ---------------------------------------------------------

    async def _arrived(self, msg: Msg) -> None:
        if not self._orphaned:
            if self._in_hand or not self._arrivals.empty() or not self._take(msg):
                self._arrivals.put_nowait(msg)  # the reader's task takes it, in order
                self._wake.set()
            return
        pending = self._unpack(msg)
        with contextlib.suppress(BrokerError):
            if pending is None:
                self._status(msg)
            elif pending.foreign:
                await self._conn.publish(pending.reply, b"+ACK")  # skipped, as ``_place`` does
            else:
                await self._hand_back(pending, due=None, delay=0.0)
        if self._pull is None and self._inbox_sub is not None:
            sub, self._inbox_sub = self._inbox_sub, None  # its last pull is over: leave now
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _take(self, msg: Msg) -> bool:
        """Take a delivered message here, in nats-py's callback, sparing the reader's task a
        wake-up: ready at once if nothing has to be looked up for it (a first delivery for
        this group, keyless, not delayed, with room), else left in hand for the task.
        False for a status message, which the task reads."""
        if self._stopping or self._consumer_gone:
            return False
        pending = self._unpack(msg)
        if pending is None:
            return False
        if (
            pending.delivered == 1
            and pending.key is None
            and pending.not_before is None
            and not pending.foreign
            and self._count(pending.touched) + len(self._ready) < self.subscription.prefetch
        ):
            self._make_ready(pending)
            if self._pull is None:
                self._wake.set()  # that was the pull's last message: time for the next
        else:
            self._in_hand.append(pending)
            self._wake.set()
        return True

    async def _notified(self, msg: Msg) -> None:
        self._dirty.add(msg.data.decode())
        self._wake.set()

    # -- the pulling task ---------------------------------------------------------------

    async def _run(self) -> None:
        pause = 0.05
        while not self._stopping:
            try:
                await self._step()
                pause = 0.05
            except BrokerError as exc:
                log.warning(
                    "subscription %s/%s: %s; retrying in %.2fs",
                    self.group.topic,
                    self.group.name,
                    exc,
                    pause,
                )
                self._pull = None
                await self._sleep(pause)
                pause = min(2.0, pause * 2)

    async def _step(self) -> None:
        while not self._arrivals.empty():
            msg = self._arrivals.get_nowait()
            pending = self._unpack(msg)
            if pending is None:
                self._status(msg)
            else:
                self._in_hand.append(pending)
        if self._consumer_gone:
            self._consumer_gone = False
            self.group = await self.broker.rejoin(self.subscription)
        while self._in_hand and not self._stopping:
            await self._place(self._in_hand[0])  # kept in hand until placed: retried after errors
            self._in_hand.popleft()
        now = self.broker.clock.monotonic()
        if self._parked and not self._stopping and (self._dirty or now >= self._recheck_at):
            await self._recheck(all_keys=now >= self._recheck_at)
        await self._keep_alive(now)
        await self._request(now)
        await self._sleep(self._next_timer(now))

    def _status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        pull = self._pull
        if pull is not None and msg.subject.endswith("." + pull.token) and status != "100":
            self._end_pull()  # 404 no messages, 408 expired, 409: this pull is over
        description = str(headers.get("Description", "")).lower()
        if status == "503" or (status == "409" and "deleted" in description):
            self._consumer_gone = True  # deleted behind our back: create it again

    def _end_pull(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            self._idle = pull.got == 0

    def _unpack(self, msg: Msg) -> Pending | None:
        if not msg.reply or not msg.reply.startswith("$JS.ACK."):
            return None
        tokens = msg.reply.split(".")
        if self._pull is not None:
            self._pull.got += 1
            self._pull.remaining -= 1
            if self._pull.remaining <= 0:
                self._end_pull()
        own, control = decode_headers(msg.headers)
        raw_due = control.get(H_NOT_BEFORE)
        address = parse_subject(msg.subject)
        return Pending(
            reply=msg.reply,
            seq=int(tokens[5]),
            delivered=int(tokens[4]),
            message=WireMessage(headers=own, body=msg.data),
            key=read_key(control),
            token=address.key_token,
            not_before=float(raw_due) if raw_due else None,
            touched=self.broker.clock.monotonic(),
            foreign=address.group not in (None, self.group.name),
        )

    async def _place(self, pending: Pending) -> None:
        if pending.foreign:
            await self._conn.publish(pending.reply, b"+ACK")
            return
        now = self.broker.clock.monotonic()
        if self._count(now) + len(self._ready) >= self.subscription.prefetch:
            await self._hand_back(pending, due=None, delay=0.0)  # more than there is room for
            return
        wall = self.broker.clock.now().timestamp()
        if pending.not_before is not None and pending.not_before > wall + 0.001:
            delay = pending.not_before - wall
            await self._hand_back(pending, due=pending.not_before, delay=delay)
            return
        if pending.state is None and pending.delivered > 1:
            pending.state = await self._stores.state(self.group.topic, self.group.name, pending.seq)
        if pending.key is None:
            self._make_ready(pending)
            return
        verdict = await self._verdict(pending)
        if verdict == "ready":
            self._make_ready(pending)
        elif verdict == "settled":
            await self._drop(pending)
        elif sum(map(len, self._parked.values())) < self.subscription.prefetch:
            parked = self._parked.setdefault(pending.token, [])
            parked.append(pending)
            parked.sort(key=lambda p: p.seq)
        else:
            waits = pending.state.waits if pending.state else 0
            delay = min(KEY_WAIT[1], KEY_WAIT[0] * 2 ** min(waits, 10))
            await self._hand_back(pending, due=None, delay=delay)

    def _make_ready(self, pending: Pending) -> None:
        self._ready.append(pending)
        self._has_ready.set()

    async def _drop(self, pending: Pending) -> None:
        """A redelivery of a message already settled (a crash between cursor and ack)."""
        if pending.state is not None:
            await self._stores.drop_state(pending.state)
        await self._conn.publish(pending.reply, b"+ACK")

    # -- per-key order ------------------------------------------------------------------

    async def _verdict(self, pending: Pending) -> Verdict:
        """Whether a keyed message is the first unsettled one of its key in the group."""
        group = self.group
        pending.cursor = await self._stores.cursor(group.topic, group.name, pending.token)
        if pending.seq <= pending.cursor.done:
            return "settled"
        for fresh in (False, True):
            low = max(pending.cursor.done, self._floor, group.start - 1)
            first = await self._first_after(pending.token, low)
            if first is None or first >= pending.seq:
                return "ready"
            if fresh or not await self._refresh_floor():
                return "wait"
        return "wait"

    async def _first_after(self, token: str, low: int) -> int | None:
        """The sequence of the first message of this group with key ``token`` after ``low``."""
        subject = self.broker.names.key_filter(self.group.topic, token)
        while True:
            found = await self._conn.direct_get(
                self.group.stream, seq=low + 1, next_by_subj=subject
            )
            if found is None:
                return None
            if parse_subject(found.subject).group in (None, self.group.name):
                return found.seq
            low = found.seq

    async def _refresh_floor(self) -> bool:
        """Read the group's ack floor again (at most every 20 ms); True if it moved."""
        now = self.broker.clock.monotonic()
        if now - self._floor_at < 0.02:
            return False
        info = await self._conn.api(
            f"CONSUMER.INFO.{self.group.stream}.{self.group.consumer}",
            None,
            what=f"reading group {self.group.name!r}",
        )
        self._floor_at = now
        floor = int(info["ack_floor"]["stream_seq"])
        moved = floor > self._floor
        self._floor = max(self._floor, floor)
        return moved

    async def _recheck(self, *, all_keys: bool) -> None:
        tokens = list(self._parked) if all_keys else [t for t in self._dirty if t in self._parked]
        self._dirty.clear()
        if all_keys:
            self._recheck_at = self.broker.clock.monotonic() + RECHECK
        for token in tokens:
            queue = self._parked[token]
            while queue and not self._stopping:
                head = queue[0]
                verdict = await self._verdict(head)
                if verdict == "wait":
                    break
                queue.pop(0)
                if verdict == "ready":
                    self._make_ready(head)
                    break
                await self._drop(head)
            if not queue:
                del self._parked[token]

    # -- leases and pulls ---------------------------------------------------------------

    def _lease_left(self) -> float:
        return self.group.lease - self.margin

    def _kept_alive(self, now: float) -> list[Pending]:
        """Parked messages always; buffered ones while the iteration keeps asking."""
        kept = list(itertools.chain(*self._parked.values()))
        if now - self._asked_at < self.group.lease:
            kept.extend(self._in_hand)
            kept.extend(self._ready)
        return kept

    async def _keep_alive(self, now: float) -> None:
        kept = self._kept_alive(now)
        every = self.group.lease / 3
        left = self._lease_left()
        if not kept or now - min(p.touched for p in kept) < min(every, left):
            return  # the common case, looked at once per step: nothing to renew or drop
        # One whose lease ran out meanwhile (an outage, a stalled loop) may be with another
        # consumer now: renewing it would renew theirs, and handing it out would duplicate.
        lost = {id(p) for p in kept if p.touched + left <= now}
        if lost:
            self._ready = deque(p for p in self._ready if id(p) not in lost)
            for token, queue in list(self._parked.items()):
                queue[:] = [p for p in queue if id(p) not in lost]
                if not queue:
                    del self._parked[token]
        for pending in self._kept_alive(now):
            if now - pending.touched >= every:
                pending.touched = now
                await self._conn.publish(pending.reply, b"+WPI")

    def _count(self, now: float) -> int:
        """Held deliveries whose lease has not run out (they count against prefetch)."""
        for delivery in [d for d in self._held if not d.holding(now)]:
            self._held.discard(delivery)
        return len(self._held)

    async def _request(self, now: float) -> None:
        pull = self._pull
        if pull is not None and (pull.generation != self._conn.generation or now > pull.ends_at):
            self._pull = pull = None  # lost with a connection, or its end never came
        if pull is not None or self._stopping or not self._conn.up:
            return
        # Asking now, or lately (within a third of a lease, as buffered ones are kept alive).
        if not self._demand and now - self._asked_at >= self.group.lease / 3:
            return
        prefetch = self.subscription.prefetch
        buffered = len(self._ready) + len(self._in_hand)
        room = prefetch - self._count(now) - buffered
        if room <= 0 or (buffered and room < (prefetch + 1) // 2):
            return  # with some buffered, wait for room for half a batch: fewer, larger pulls
        if self._idle:
            room = 1  # nothing came last time: hold the server's next message only
        token = str(next(self._tokens))
        request = {"batch": room, "expires": _PULL_EXPIRES_NS}
        self._pull = _Pull(token, room, now + PULL_EXPIRES + 1.0, self._conn.generation)
        await self._conn.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.group.stream}.{self.group.consumer}",
            json.dumps(request).encode(),
            reply=f"{self._inbox}.{token}",
        )

    def _next_timer(self, now: float) -> float:
        due = now + RECHECK * 2
        if self._pull is not None:
            due = min(due, self._pull.ends_at)
        if self._parked:
            due = min(due, self._recheck_at)
        kept = self._kept_alive(now)
        if kept:
            due = min(due, min(p.touched for p in kept) + self.group.lease / 3)
        if self._held:
            due = min(due, min(d.deadline for d in self._held))
        return max(0.0, due - now)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    # -- handing out and back -----------------------------------------------------------

    async def _hand_out(self, pending: Pending) -> NatsDelivery:
        now = self.broker.clock.monotonic()
        if now - pending.touched > self.margin:
            # Restart the server's lease now, so that it runs from the hand-out.
            with contextlib.suppress(BrokerError):
                await self._conn.publish(pending.reply, b"+WPI")
                pending.touched = now
        delivery = NatsDelivery(self, pending, pending.touched + self._lease_left())
        self._held.add(delivery)
        return delivery

    async def _hand_back(self, pending: Pending, *, due: float | None, delay: float) -> None:
        """Return an unseen message to the group: not an attempt, so it is recorded as a wait."""
        delay = await self._record_wait(pending, due=due, delay=delay)
        await self._conn.publish(pending.reply, nak_payload(delay))

    async def _record_wait(self, pending: Pending, *, due: float | None, delay: float) -> float:
        """Count a delivery that was not an attempt; the delay to hand it back with.

        One published with a delay goes back until its time, whatever the caller asked.
        """
        group = self.group
        wall = self.broker.clock.now().timestamp()
        if pending.not_before is not None and pending.not_before > wall:
            due, delay = pending.not_before, max(delay, pending.not_before - wall)
        state = pending.state
        if state is None:
            state = MessageState()
            if pending.delivered > 1:
                state = await self._stores.state(group.topic, group.name, pending.seq)
        updated = replace(state, waits=state.waits + 1, due=due)
        pending.state = await self._stores.save_state(group.topic, group.name, pending.seq, updated)
        return delay
