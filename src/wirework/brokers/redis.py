"""The Redis Streams backend (``redis://`` and ``rediss://``).

The model maps onto Redis as DESIGN.md draws it: a stream per topic
(``{namespace}:t:<topic>``), a consumer group per wirework group, the group's
pending entries list (PEL) as the copies it holds. What Streams lack, Lua
scripts build on top, each step one atomic script (``redis_scripts``):

* leases and delays are zsets scored in the *server's* milliseconds (``TIME``),
  so clients with skewed clocks agree on when a lease ran out;
* per-key order: a list per (group, key) of the group's unsettled copies; only
  its head is handed out, the rest wait parked, and settling the head frees
  the next, so a busy key never holds back other keys;
* nack and replay stay inside the group: a nacked copy stays in the group's
  PEL, a replayed dead letter goes to a stream of that group alone;
* retention: a stream entry is deleted as soon as no group still needs it;
* dead letters: one stream per namespace, listed, read and replayed by id;
* the PEL's delivery count is the attempt number, and a settle names the
  attempt it settles, so a stale settle (lease ran out, message taken again)
  changes nothing;
* wake-ups: an idle subscription waits on pub/sub, and while it is registered
  as idle a publish does its fetch and sends the message in the wake-up (the
  hand-over, ``redis_scripts``): one round trip less on the way to a quiet
  consumer, such as a responder between requests.

Durability, stated loudly: Redis acknowledges a write once it is in memory.
What survives a crash is what the server's persistence kept (RELIABILITY.md
§1.1): with ``appendonly yes`` and ``appendfsync always`` every acknowledged
publish is on disk; with ``everysec`` (Redis's default) about the last second
can be lost on an OS crash or power loss; with persistence off, a restart
loses everything. ``wait_aof=True`` makes publish wait for ``WAITAOF`` (Redis
7.2 or later only). Replication is asynchronous: a failover can lose
acknowledged writes (Jepsen, RELIABILITY.md §1.1). Cluster mode is not
supported (all keys of a namespace share one hash slot, but it is untested).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import orjson

from wirework.brokers import redis_scripts as scripts
from wirework.brokers.base import (
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
    seconds_left,
)
from wirework.brokers.redis_link import (
    Backoff,
    Doorbell,
    GroupMissingError,
    Link,
    log,
    where,
)
from wirework.brokers.redis_model import RedisSettings as RedisSettings
from wirework.brokers.redis_model import (
    dead_letter_of,
    key_prefix,
    milliseconds,
    moment,
    text,
)
from wirework.brokers.redis_replies import RedisReplies
from wirework.clock import SYSTEM_CLOCK, Clock, SystemClock, wait_first
from wirework.envelope import WireMessage
from wirework.errors import (
    AlreadySettledError,
    BrokerBusyError,
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DeadLetterNotFoundError,
    QueueFullError,
)

#: New stream entries one fetch reads at most beyond what it hands out (parked, delayed).
_SCAN_LIMIT = 256

#: Dead letters read per round trip while listing.
_PAGE = 500

_STREAM_ID = re.compile(r"^\d+-\d+$")


class _Held:
    """What one subscription iteration holds: its consumer name and unsettled deliveries."""

    def __init__(self, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        self.consumer = uuid.uuid4().hex
        self.deliveries: set[RedisDelivery] = set()
        self.room = asyncio.Event()
        self.handed: list[bytes] = []
        """Rows a publish handed over (``redis_scripts``: hand-over), not yet taken."""
        self.seen = 0
        """Messages handed over and received so far: a fetch tells the script."""
        self.losses = 0
        """The doorbell's ``losses`` at the last fetch: when it grew, the fetch recovers."""

    def receive(self, rows: list[bytes]) -> None:
        self.handed += rows
        self.seen += len(rows) // scripts.ROW_FIELDS

    def drop(self, delivery: RedisDelivery) -> None:
        if delivery in self.deliveries:
            self.deliveries.discard(delivery)
            self.room.set()


class RedisDelivery(Delivery):
    """One copy held by one subscription; settles name the attempt they settle."""

    def __init__(
        self,
        broker: RedisBroker,
        held: _Held,
        member: str,
        attempt: int,
        first_failure_ms: bytes,
        message: WireMessage,
        key: str | None,
    ) -> None:
        self.message = message
        self.topic = held.topic
        self.group = held.group
        self.key = key
        self.attempt = attempt
        self.first_failure_at = moment(first_failure_ms) if first_failure_ms else None
        self.member = member
        self.handed_out = False
        self._broker = broker
        self._held = held
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _begin(self) -> None:
        if self._settled:
            raise AlreadySettledError(
                f"delivery of {self.message.message_id!r} on {self.topic}/{self.group} "
                f"was already settled"
            )
        self._settled = True
        self._held.drop(self)

    def _args(self, *extra: str | int) -> list[str | bytes | int]:
        held = self._held
        return [held.topic, held.group, held.consumer, self.member, self.attempt, *extra]

    async def ack(self) -> None:
        self._begin()
        keyed = self.key is not None
        args = self._args("1" if keyed else "0", self.key or "")
        await self._broker._settle(self, scripts.ACK, args, "acking")

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        _check_delay(delay)
        self._begin()
        error_json = error.model_dump_json() if error is not None else ""
        args = self._args(milliseconds(delay), error_json)
        await self._broker._settle(self, scripts.NACK, args, "nacking")

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        self._begin()
        error_json = error.model_dump_json() if error is not None else ""
        args = self._args(reason.value, error_json)
        await self._broker._settle(self, scripts.DEAD_LETTER, args, "dead-lettering")


class RedisBroker(Broker, DeadLetterStore, Inspectable, GroupAdmin):
    """The broker contract on Redis Streams; open with ``connect("redis://host:6379/0")``.

    Attributes:
        stale_settles: settles that changed nothing because the delivery had lost its
            message (its lease ran out and it went to another consumer, or it was handed back).
    """

    def __init__(
        self,
        url: str,
        *,
        settings: RedisSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or RedisSettings()
        self.max_message_bytes = self.settings.max_message_bytes
        self.url = url
        self.prefix = key_prefix(self.settings.namespace)
        self.stale_settles = 0
        self._clock = clock or SYSTEM_CLOCK
        self._link = Link(
            url,
            clock=self._clock,
            connect_timeout=self.settings.connect_timeout,
            command_timeout=self.settings.command_timeout,
            backoff=(self.settings.reconnect_initial_backoff, self.settings.reconnect_max_backoff),
            max_connections=self.settings.max_connections,
        )
        self._doorbell = Doorbell(self._link, self.prefix)
        self._holding: set[_Held] = set()
        self._closed = False
        self._closing = asyncio.Event()
        self._aof_checked = not self.settings.wait_aof
        self._publish_pid = 0
        self._publish_prefix = ""
        self._publish_count = itertools.count()

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"the Redis broker on {where(self.url)} is closed")

    async def _call(
        self,
        script: scripts.Script,
        args: Sequence[str | bytes | int],
        *,
        what: str,
        resend: bool = True,
        wait_aof: bool = False,
        until: Callable[[], float | None] | None = None,
    ) -> Any:
        """A script under the settings' outage policy (``on_disconnect``, ``publish_timeout``)."""
        return await self._link.call(
            script,
            [self.prefix, *args],
            what=what,
            resend=resend,
            wait=self.settings.on_disconnect == "wait",
            timeout=self.settings.publish_timeout,
            wait_aof_ms=milliseconds(self.settings.wait_aof_timeout) if wait_aof else None,
            until=until,
        )

    # -- publishing ----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Store ``message``; return once Redis holds it (see the module docstring).

        A publish that fails with ``BrokerUnavailableError`` was not stored, unless its
        message says the outcome is unknown: it was on the wire when the connection
        broke, and re-sending it under its dedup id did not succeed within
        ``publish_timeout``. The time it waits for a free connection (a burst of
        publishes queues for ``max_connections``) does not count; a message with its
        own deadline (a request) waits at most until then, and then raises
        ``DeadlineExceededError``: nothing was sent.
        """
        self._check_open()
        check_name("topic", topic)
        self.check_size(topic, message)
        _check_delay(delay)
        if not self._aof_checked:
            await self._check_wait_aof()
        args: list[str | bytes | int] = [
            topic,
            orjson.dumps(dict(message.headers)),
            message.body,
            "0" if key is None else "1",
            key or "",
            milliseconds(delay),
            self._publish_id(),
            milliseconds(self.settings.publish_timeout + 10.0),
            self.settings.max_queue_length or 0,
        ]
        outcome = await self._call(
            scripts.PUBLISH,
            args,
            what=f"publishing to {topic!r}",
            wait_aof=self.settings.wait_aof,
            until=lambda: seconds_left(message.headers, self._clock.now()),
        )
        if outcome == scripts.FULL:
            raise QueueFullError(
                f"topic {topic!r} keeps {self.settings.max_queue_length} messages not yet "
                f"settled by every group (max_queue_length); nothing was stored: consume "
                f"faster, add consumers, or raise the limit"
            )
        self._doorbell.ring(topic)

    def _publish_id(self) -> str:
        """A publish's dedup id: a random prefix of this broker's and a count. As unique as
        a uuid4 per publish, without its 2 us (an os.urandom call) on the way of every
        publish; a process forked with the broker takes a prefix of its own, or its
        publishes would pass for its parent's re-sends and be dropped."""
        pid = os.getpid()
        if pid != self._publish_pid:
            self._publish_pid = pid
            self._publish_prefix = uuid.uuid4().hex + "-"
        return self._publish_prefix + str(next(self._publish_count))

    async def _check_wait_aof(self) -> None:
        info = text(await self._link.command("INFO", "server", what="reading the server version"))
        found = re.search(r"redis_version:(\d+)\.(\d+)", info)
        version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
        if version < (7, 2):
            raise ConfigurationError(
                f"wait_aof needs Redis 7.2 or later (WAITAOF); {where(self.url)} runs "
                f"{'.'.join(map(str, version))}: turn wait_aof off and set appendonly yes with "
                f"appendfsync always on the server, or upgrade Redis"
            )
        self._aof_checked = True

    # -- consuming -----------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> AsyncGenerator[RedisDelivery, None]:
        """Deliveries for one consumer of the group, as an async generator.

        Leaving it (``aclose``, cancellation) hands back at once what it held,
        including what it fetched but never yielded. A lost connection pauses
        it; it resumes by itself once Redis answers again.

        Raises:
            BrokerClosedError: the broker was closed.
        """
        self._check_open()
        return self._deliveries(subscription)

    async def _deliveries(self, subscription: Subscription) -> AsyncGenerator[RedisDelivery, None]:
        self._check_open()
        held = _Held(subscription.topic, subscription.group)
        self._holding.add(held)
        wake = self._doorbell.waiter(held.topic, held.consumer, held.receive)
        backoff = Backoff(
            self.settings.reconnect_initial_backoff, self.settings.reconnect_max_backoff
        )
        waiting: deque[RedisDelivery] = deque()
        joined = False
        # Set when the last fetch emptied the topic: until when to wait for a wake-up before
        # the next fetch, once what it took is handed out (it set ``idle:T``: a publish rings,
        # and hands new messages over while the consumer is registered as idle).
        idle_until: float | None = None
        try:
            while not self._closed:
                if waiting:
                    delivery = waiting.popleft()
                    if delivery not in held.deliveries:
                        continue  # handed back meanwhile (the broker closed)
                    delivery.handed_out = True
                    yield delivery
                    continue
                if held.handed:
                    rows, held.handed = held.handed, []
                    waiting.extend(self._deliveries_of(held, rows))
                    continue
                free = subscription.prefetch - len(held.deliveries)
                if free <= 0:
                    held.room.clear()
                    await self._wait(held.room, None)
                    continue
                if idle_until is not None:
                    pause = idle_until - self._clock.monotonic()
                    if pause > 0:
                        await self._idle(wake, pause)
                    if held.handed and not wake.rung and idle_until > self._clock.monotonic():
                        wake.clear()  # only a hand-over: take it, and stay idle
                        continue
                    idle_until = None
                    continue
                wake.clear()
                try:
                    if not joined:
                        args = [held.topic, held.group, subscription.start]
                        await self._call(scripts.JOIN, args, what=f"joining {held.group!r}")
                        joined = True
                    fetched, next_ms, more = await self._fetch(held, subscription, free)
                except GroupMissingError:
                    joined = False
                    continue
                except (BrokerUnavailableError, BrokerBusyError, QueueFullError) as exc:
                    # Passing states (unreachable, every connection busy, at maxmemory):
                    # only a close ends a subscription. A fetch cut off mid-reply left its
                    # messages leased to us; they come back when that lease runs out.
                    if not isinstance(exc, BrokerUnavailableError):
                        log.warning("fetching from %s/%s: %s", held.topic, held.group, exc)
                    await self._wait(self._closing, backoff.next())
                    await self._link.wait_up(None)
                    continue
                backoff.reset()
                waiting.extend(fetched)
                if more or next_ms == scripts.FILLED:
                    continue
                rest = self.settings.poll_interval
                if next_ms >= 0:
                    rest = min(rest, next_ms / 1000 + 0.001)
                idle_until = self._clock.monotonic() + rest
        finally:
            self._doorbell.forget(held.topic, wake, held.consumer)
            self._holding.discard(held)
            if joined and not self._closed:
                await asyncio.shield(self._release(held))

    async def _fetch(
        self, held: _Held, subscription: Subscription, free: int
    ) -> tuple[list[RedisDelivery], int, bool]:
        lease_ms = max(1, milliseconds(subscription.lease_timeout))
        args: list[str | bytes | int] = [held.topic, held.group, held.consumer, free, lease_ms]
        # Registered for hand-overs until a little past its next fetch (``poll_interval``),
        # if its wake-ups are being listened to; when they may have been lost since the
        # last fetch, what was handed over and never seen comes again.
        listening = self._doorbell.listening(held.topic)
        idle_ms = milliseconds(self.settings.poll_interval + 0.5) if listening else 0
        losses = self._doorbell.losses
        recover = held.losses != losses
        args += [_SCAN_LIMIT + free, held.seen, idle_ms, "1" if recover else "0"]
        if recover:
            args += [delivery.member for delivery in held.deliveries]
        reply = await self._link.call(
            scripts.FETCH,
            [self.prefix, *args],
            what=f"fetching from {held.topic}/{held.group}",
            resend=False,
            wait=False,
            timeout=self.settings.publish_timeout,
        )
        # Only a fetch that ran has recovered: one that failed (the link cut with the
        # listener's) leaves the recovery to the next, after the reconnect.
        held.losses = losses
        next_ms, more, rows = int(reply[0]), bool(reply[1]), reply[2:]
        return self._deliveries_of(held, rows), next_ms, more

    def _deliveries_of(self, held: _Held, rows: Sequence[Any]) -> list[RedisDelivery]:
        """Deliveries, now held, from a fetch's rows (or a hand-over's: the same fields)."""
        fetched: list[RedisDelivery] = []
        for i in range(0, len(rows), scripts.ROW_FIELDS):
            member, attempt, first, headers, body, has_key, key = rows[i : i + scripts.ROW_FIELDS]
            delivery = RedisDelivery(
                self,
                held,
                text(member),
                int(attempt),
                first,
                WireMessage(headers=orjson.loads(headers), body=bytes(body)),
                text(key) if has_key == b"1" else None,
            )
            held.deliveries.add(delivery)
            fetched.append(delivery)
        return fetched

    async def _release(self, held: _Held) -> None:
        """Hand back what ``held`` still holds; if Redis is unreachable, leases run out instead."""
        pending = list(held.deliveries)
        held.deliveries.clear()
        args: list[str | bytes | int] = [held.topic, held.group, held.consumer]
        for delivery in pending:
            args += [delivery.member, delivery.attempt, "0" if delivery.handed_out else "1"]
        with contextlib.suppress(BrokerError):
            await self._link.call(
                scripts.RELEASE,
                [self.prefix, *args],
                what=f"handing back deliveries of {held.topic}/{held.group}",
                resend=True,
                wait=False,
                timeout=self.settings.command_timeout,
            )
        self._doorbell.ring(held.topic)

    async def _settle(
        self,
        delivery: RedisDelivery,
        script: scripts.Script,
        args: Sequence[str | bytes | int],
        verb: str,
    ) -> None:
        if self._closed:
            raise BrokerClosedError(
                f"the Redis broker on {where(self.url)} closed before this delivery was settled; "
                f"its message will be delivered again"
            )
        outcome = await self._call(
            script, args, what=f"{verb} {delivery.message.message_id!r} on {delivery.topic}"
        )
        if outcome not in (scripts.SETTLED, scripts.WOKE):
            self.stale_settles += 1
        elif outcome == scripts.WOKE or script is scripts.NACK:
            # Something is there to hand out (the key's next copy, the nacked one once due):
            # wake this process's subscriptions; the script woke idle ones elsewhere.
            self._doorbell.ring(delivery.topic)

    async def _wait(self, event: asyncio.Event, pause: float | None) -> None:
        """Until ``event`` is set, the broker closes, or ``pause`` passes on the clock."""
        await wait_first(event, self._closing, clock=self._clock, pause=pause)

    async def _idle(self, wake: asyncio.Event, pause: float) -> None:
        """An idle subscription's wait for its wake-up (``aclose`` rings it too), at most
        ``pause``. On the system clock without ``wait_first``'s three tasks per wait: this
        wait ends on the path of every request to a quiet responder."""
        if type(self._clock) is not SystemClock:
            await self._wait(wake, pause)
            return
        if wake.is_set() or self._closed:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await wake.wait()

    async def aclose(self) -> None:
        """Hand back every held delivery, end every subscription, close the connections."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._doorbell.ring_all()  # idle subscriptions (``_idle``) wait for their bell only
        for held in list(self._holding):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.command_timeout):
                    await self._release(held)
        await self._doorbell.aclose()
        await self._link.aclose()

    # -- groups ----------------------------------------------------------------------

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group at ``subscription.start`` unless it exists; returns once it does."""
        self._check_open()
        args = [subscription.topic, subscription.group, subscription.start]
        await self._call(scripts.JOIN, args, what=f"declaring group {subscription.group!r}")

    async def delete_group(self, topic: str, group: str) -> None:
        """Forget a group, its undelivered copies and parked keys; a topic left without
        groups goes too. Its dead letters stay. A subscription still running on the group
        creates it again (at its start position) on its next fetch."""
        self._check_open()
        check_name("topic", topic)
        check_name("group", group)
        await self._call(scripts.DELETE_GROUP, [topic, group], what=f"deleting group {group!r}")

    # -- dead letters and inspection -----------------------------------------------

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        self._check_open()
        found: list[DeadLetter] = []
        start = "-"
        while len(found) < limit:
            page = await self._link.command(
                "XRANGE",
                self.prefix + "dlq",
                start,
                "+",
                "COUNT",
                _PAGE,
                what="listing dead letters",
            )
            for entry_id, fields in page:
                record = dead_letter_of(text(entry_id), fields)
                if (
                    (topic is None or record.topic == topic)
                    and (group is None or record.group == group)
                    and (reason is None or record.reason == reason)
                ):
                    found.append(record)
            if len(page) < _PAGE:
                break
            start = "(" + text(page[-1][0])
        return found[: max(0, limit)]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        self._check_open()
        if _STREAM_ID.fullmatch(dead_letter_id):
            page = await self._link.command(
                "XRANGE",
                self.prefix + "dlq",
                dead_letter_id,
                dead_letter_id,
                what="reading a dead letter",
            )
            if page:
                return dead_letter_of(text(page[0][0]), page[0][1])
        raise DeadLetterNotFoundError(
            f"no dead letter with id {dead_letter_id!r}; `wirework dlq list` shows the ids"
        )

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        """Hand dead letters back to their group alone, at the end of its queue.

        The message keeps its id, headers, body and key; its attempt count starts
        again. All move in one atomic step, or none if an id is unknown.
        """
        self._check_open()
        ids = list(dict.fromkeys(dead_letter_ids))
        for one in ids:
            if not _STREAM_ID.fullmatch(one):
                raise DeadLetterNotFoundError(f"no dead letter with id {one!r}; nothing was moved")
        if not ids:
            return 0
        found, detail = await self._call(
            scripts.REPLAY, ids, what="replaying dead letters", resend=False
        )
        if not found:
            raise DeadLetterNotFoundError(
                f"no dead letter with id {text(detail)!r}; nothing was moved"
            )
        self._doorbell.ring_all()  # the records are gone; whichever topics they were, wake
        return int(detail)

    async def stats(self) -> Sequence[GroupStats]:
        """One row per (topic, group), sorted; expired leases count as ready."""
        self._check_open()
        rows = await self._call(scripts.STATS, [], what="reading stats")
        result = [
            GroupStats(
                topic=text(topic),
                group=text(group) or None,
                ready=max(0, int(ready)),
                delayed=max(0, int(delayed)),
                in_flight=max(0, int(in_flight)),
                dead_lettered=max(0, int(dead)),
            )
            for topic, group, ready, delayed, in_flight, dead in rows
        ]
        return sorted(result, key=lambda row: (row.topic, row.group or ""))

    # -- direct replies ------------------------------------------------------------

    def direct_replies(self) -> RedisReplies:
        """Replies straight to a caller's own stream, read with a blocking XREAD
        (``redis_replies``): no group, lease or ack on the way back."""
        return RedisReplies(self)


def _check_delay(delay: float) -> None:
    if not delay >= 0:  # also refuses NaN
        raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")


async def purge_namespace(url: str, namespace: str) -> None:
    """Delete every key this backend created under ``namespace`` on the server at ``url``.

    Subscriptions still running in that namespace end up with missing groups and
    recreate them empty; purge only what nothing uses any more.
    """
    check_name("namespace", namespace)
    link = Link(
        url,
        clock=SYSTEM_CLOCK,
        connect_timeout=5.0,
        command_timeout=30.0,
        backoff=(0.05, 1.0),
        max_connections=2,
    )
    try:
        cursor = 0
        pattern = key_prefix(namespace) + "*"
        while True:
            cursor_bytes, keys = await link.command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, what=f"purging {namespace!r}"
            )
            if keys:
                await link.command("UNLINK", *keys, what=f"purging {namespace!r}")
            cursor = int(cursor_bytes)
            if cursor == 0:
                break
    finally:
        await link.aclose()
