"""The RabbitMQ backend (``amqp://``): quorum queues, publisher confirms, and what is built on top.

How the model maps (every name starts with the ``namespace`` setting)::

    topic T        direct exchange <ns>:t:T  (alternate exchange -> queue <ns>:t:T:hold)
    group G of T   queues <ns>:g:T:G:any (keyless, round-robin between subscriptions)
                   and <ns>:g:T:G:p0..p<n-1> (keyed, a single active consumer each)
    dead letters   queue <ns>:g:T:G:dead, one record (message + metadata) per message
    delays         TTL queues <ns>:t:T:d<k> and <ns>:g:T:G:d<k>, dead-lettering back
    catalog        queue <ns>:catalog, listing the topics, groups and delay queues

Durability (RELIABILITY.md §1.1, "quorum queues and DLX"): ``publish`` returns
only after ``basic.ack`` (publisher confirms, persistent messages, quorum
queues: a confirm means a quorum of replicas holds it). ``basic.nack``, a
return, or a connection lost before anything was written raise
``BrokerUnavailableError`` (not stored); a connection lost *after* the write
raises ``PublishOutcomeUnknownError`` (it may be stored). With
``on_disconnect="wait"`` a publish waits for the next connection and is sent
again, so it ends in success (stored once, or twice with the same id) or, after
``publish_timeout``, in one of those errors. At most ``publish_window``
publishes are sent and unconfirmed at once; the others wait their turn before
anything is sent, with ``publish_timeout`` paused (a burst of thousands is not
reported outcome-unknown for the queue in front of it), and a message with its
own deadline (a request) waits at most until that deadline, then raises
``DeadlineExceededError``: nothing was sent. Delay queues dead-letter with the
``at-least-once`` strategy and ``reject-publish`` overflow, as RabbitMQ requires
for safe dead-lettering. Classic queues (``queue_type="classic"``) are an
option with weaker promises: no replication, at-most-once dead-lettering out of
delay queues, and attempt counts from the ``redelivered`` flag only.

Built on top, because RabbitMQ lacks it (see ``rabbitmq_subscription``):
leases (a keyless delivery past its lease is republished for another
consumer; a keyed one is handed out again, in order, by its subscription),
nack with delay and delayed publish (TTL buckets: never early, at most 19 %
late), per-key order (partitions with a single active consumer, and a local
key gate), retention for a topic with no group (an alternate exchange into a
hold queue, which the first group takes), attempts and first-failure time (a
header on republished copies plus the quorum queue's ``x-delivery-count``).

LIMITS, where this backend differs from the memory reference (docs/backends/rabbitmq.md):

* ``stats()``: ``in_flight`` counts the deliveries of *this* broker object
  only, and ``ready`` misses what other processes prefetched but have not
  handed out: RabbitMQ reports unacked counts only through its management plugin.
* the messages a topic kept while it had no group go to the first group
  created (one process moves them, in order); a later ``earliest`` group does
  not get copies of messages other groups still hold.
* keyed messages of a partition go to one subscription at a time (failover,
  not load balancing); a process that is alive but stuck holds its
  partitions' keyed messages (re-handed within it when leases run out).
* a nacked keyed message is retried from the back of its partition, so later
  messages of its key may pass it (RELIABILITY.md P4 allows reordering on retry).
* a subscription prefetches up to ``prefetch`` messages *per queue* it reads
  (keyless queue and each partition), handing out at most ``prefetch``; a
  message prefetched but not handed out by a subscription that left or died
  counts an attempt (RabbitMQ counts returns, not handler attempts).
* a keyless delivery whose lease ran out keeps its prefetch slot (so a stuck
  consumer takes nothing new) until its subscription is asked for more, or left.
* two processes reading the same dead-letter or catalog queue at the same
  instant may each see part of it (reads take messages and hand them back).
* delays are rounded up (at most 19 % late) and limited to about 22 days.
* header names ``CC``, ``BCC``, ``x-death``, ``x-delivery-count``,
  ``x-first-death-*``, ``x-last-death-*``, ``x-stream-offset``, ``x-wirework*``
  and ``wirework-delay-queue`` are refused on publish: RabbitMQ or wirework read them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncGenerator, Coroutine, Sequence
from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.brokers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    NAME_PATTERN,
    Broker,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    GroupAdmin,
    GroupStats,
    Inspectable,
    Subscription,
    check_name,
    seconds_left,
)
from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.envelope import WireMessage
from wirework.errors import (
    BrokerClosedError,
    BrokerUnavailableError,
    ConfigurationError,
    DeadlineExceededError,
    PublishOutcomeUnknownError,
)

try:
    import aiormq
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the RabbitMQ backend needs aiormq: pip install 'wirework[rabbitmq]'"
    ) from exc

from wirework.brokers.rabbitmq_dead import (
    find_dead_letter,
    list_dead_letters,
    replay_dead_letters,
)
from wirework.brokers.rabbitmq_link import Link, amqp_errors, redact
from wirework.brokers.rabbitmq_names import (
    DELAY_HEADER,
    Meta,
    Names,
    bucket_for,
    check_headers,
    outgoing_headers,
    partition_kind,
)
from wirework.brokers.rabbitmq_replies import RabbitReplies
from wirework.brokers.rabbitmq_subscription import RabbitDelivery, SubscriptionState
from wirework.brokers.rabbitmq_topology import (
    Entry,
    MissingError,
    Mode,
    Progress,
    Topology,
    group_queues,
)

__all__ = ["RabbitBroker", "RabbitDelivery", "RabbitSettings", "purge_namespace"]

log = logging.getLogger("wirework.brokers.rabbitmq")

T = TypeVar("T")


class RabbitSettings(BaseSettings):
    """Options of ``amqp://`` (query string, keyword or ``WIREWORK_RABBITMQ_*``)."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_RABBITMQ_", extra="forbid")

    namespace: str = "wirework"
    """Prefix of every exchange and queue this backend creates, so apps and tests never meet."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    """Largest message ``publish`` accepts, headers included (RELIABILITY.md §3.7)."""
    queue_type: Literal["quorum", "classic"] = "quorum"
    """Quorum: replicated, confirmed by a quorum, counts deliveries; classic: lighter, weaker."""
    partitions: int = Field(default=4, ge=1, le=64)
    """Keyed queues per group; every client of a namespace must use the same number."""
    publish_timeout: float = Field(default=10.0, gt=0)
    """Longest a publish (waiting for a connection and the confirm) takes before it fails;
    the time it waits for its turn in ``publish_window`` does not count."""
    publish_window: int = Field(default=128, ge=1, le=65_535)
    """Publishes sent and not yet confirmed at once, per broker; the others wait their turn
    before they are sent (a request at most until its own deadline)."""
    on_disconnect: Literal["fail", "wait"] = "fail"
    """During an outage: fail a publish at once, or wait for the connection (publish_timeout)."""
    connect_timeout: float = Field(default=5.0, gt=0)
    """Longest one connection attempt takes (TCP, AMQP handshake)."""
    reconnect_initial_backoff: float = Field(default=0.1, gt=0)
    """First pause between reconnection attempts; doubled (with jitter) after each failure."""
    reconnect_max_backoff: float = Field(default=5.0, gt=0)
    """Longest pause between reconnection attempts."""
    heartbeat: int = Field(default=10, ge=0, le=600)
    """AMQP heartbeat seconds: a silent peer (a cut cable, a paused VM) is noticed after ~3x."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError("use 1-200 characters from A-Z a-z 0-9 . _ -")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> RabbitSettings:
        if self.reconnect_max_backoff < self.reconnect_initial_backoff:
            raise ValueError("reconnect_max_backoff must be at least reconnect_initial_backoff")
        return self


class RabbitBroker(Broker, DeadLetterStore, Inspectable, GroupAdmin):
    """The broker contract on RabbitMQ; open with ``connect("amqp://user:pass@host/vhost")``.

    Nothing is contacted until first use. Attributes:
        stale_settles: settles ignored because the delivery no longer held its message.
    """

    def __init__(
        self, url: str, *, settings: RabbitSettings | None = None, clock: Clock | None = None
    ) -> None:
        if not url.lower().startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"RabbitMQ URL {redact(url)!r} must start with amqp://")
        self.settings = settings or RabbitSettings()
        self.max_message_bytes = self.settings.max_message_bytes
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.closed = False
        self.stale_settles = 0
        self._states: set[SubscriptionState] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.link = Link(url, self.settings, self.spawn)
        names = Names(self.settings.namespace)
        self.topology = Topology(self.link, names, self.settings, self.spawn)
        self._publish_mode = Mode(
            self.settings.on_disconnect == "wait", self.settings.publish_timeout
        )

    @property
    def internal_mode(self) -> Mode:
        """How settles and copies meet an outage: at once, as their channel is gone too."""
        return Mode(False, self.settings.publish_timeout)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run background work owned by this broker; ``aclose`` cancels what is left."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to its end even if the caller is cancelled (a deadline): an AMQP call
        cancelled half-way makes aiormq close its channel, and a channel number freed before
        the broker confirmed the close can desynchronise the whole connection."""
        return await asyncio.shield(self.spawn(work))

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closed:
            log.warning("background work failed: %r", task.exception())

    def _check_open(self) -> None:
        if self.closed:
            raise BrokerClosedError("the RabbitMQ broker was closed")

    # -- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self._check_open()
        check_name("topic", topic)
        self.check_size(topic, message)
        if not delay >= 0:  # also refuses NaN
            raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")
        bucket = bucket_for(delay) if delay > 0 else None
        check_headers(message.headers)
        headers = outgoing_headers(message, Meta(key=key).table())
        routing_key = partition_kind(key, self.settings.partitions)
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout
        progress = Progress(deadline, until=lambda: self._until(message))
        try:
            await self._publish(topic, routing_key, bucket, message.body, headers, progress)
        except DeadlineExceededError:  # also a TimeoutError: its own deadline, not ours
            raise
        except TimeoutError:
            if progress.sent:
                raise _unknown(topic, "no confirm within publish_timeout") from None
            raise BrokerUnavailableError(
                f"publish to {topic!r} not done within publish_timeout "
                f"({self.settings.publish_timeout}s); nothing was stored, retry later"
            ) from None
        except PublishOutcomeUnknownError as exc:
            raise _unknown(topic, str(exc)) from exc
        except MissingError as exc:  # gone again right after being declared again
            if exc.maybe_stored:
                raise _unknown(topic, str(exc)) from exc
            raise BrokerUnavailableError(
                f"publish to {topic!r}: {exc}; nothing was stored, retry later"
            ) from exc

    def _until(self, message: WireMessage) -> float | None:
        """The message's own deadline in loop time (a request's), or None."""
        left = seconds_left(message.headers, self.clock.now())
        return None if left is None else asyncio.get_running_loop().time() + left

    async def _publish(
        self,
        topic: str,
        routing_key: str,
        bucket: int | None,
        body: bytes,
        headers: dict[str, Any],
        progress: Progress,
    ) -> None:
        """Send until confirmed; in wait mode again after every outage, until the deadline.

        The common case (the topic declared on this connection) goes straight to the
        send; declaring and waiting out an outage are bounded by ``progress.deadline``.
        """
        topology, mode = self.topology, self._publish_mode
        missing = False
        while True:
            try:
                if bucket is None:
                    exchange = topology.topic_ready(topic)
                    if exchange is None:
                        async with asyncio.timeout_at(progress.deadline):
                            await topology.ensure_topic(topic, mode)
                        exchange = topology.names.topic_exchange(topic)
                    await topology.send(exchange, routing_key, body, headers, mode, progress)
                else:
                    async with asyncio.timeout_at(progress.deadline):
                        queue = await topology.ensure_bucket(topic, None, bucket, mode)
                    delayed = {**headers, DELAY_HEADER: queue}
                    exchange = topology.names.delay_exchange
                    await topology.send(exchange, routing_key, body, delayed, mode, progress)
                return
            except MissingError:
                topology.forget()  # deleted behind our back: declare again, once
                if missing:
                    raise
                missing = True
            except BrokerUnavailableError:  # also PublishOutcomeUnknownError
                if not mode.wait:
                    raise
                async with asyncio.timeout_at(progress.deadline):
                    await asyncio.sleep(self.settings.reconnect_initial_backoff)
                    await self.link.connected(wait=True, timeout=None)

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> AsyncGenerator[RabbitDelivery, None]:
        """Deliveries for one consumer of the group; resumes by itself after an outage.

        The first attach fails with ``BrokerUnavailableError`` if RabbitMQ cannot
        be reached and ``on_disconnect`` is ``"fail"``; later outages are waited out.

        Raises:
            BrokerClosedError: the broker was closed.
        """
        self._check_open()
        return self._deliveries(subscription)

    async def _deliveries(self, subscription: Subscription) -> AsyncGenerator[RabbitDelivery, None]:
        self._check_open()
        state = SubscriptionState(self, subscription)
        self._states.add(state)
        try:
            while (delivery := await state.next()) is not None:
                yield delivery
        finally:
            self._states.discard(state)
            await state.leave()

    async def aclose(self) -> None:
        """End every subscription and close the connection (which hands back what they held)."""
        if self.closed:
            return
        self.closed = True
        for state in list(self._states):
            state.notify()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        await self.link.aclose()

    # -- groups ---------------------------------------------------------------------------

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group now, at its start position, as ``subscribe`` would on first use."""
        self._check_open()
        await self.shielded(self._declare_group(subscription))

    async def _declare_group(self, subscription: Subscription) -> None:
        mode = Mode(self.settings.on_disconnect == "wait", self.settings.publish_timeout)
        topic, group = subscription.topic, subscription.group
        new = await self.topology.ensure_group(topic, group, mode)
        await self.topology.adopt_held(topic, group, subscription.start, new, mode)

    async def delete_group(self, topic: str, group: str) -> None:
        """Delete a group with its undelivered messages (dead letters stay while any remain);
        a topic left with no group is deleted too. No error if the group is absent."""
        self._check_open()
        check_name("topic", topic)
        check_name("group", group)
        await self.shielded(self.topology.delete_group(topic, group))

    # -- dead letters --------------------------------------------------------------------

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        """Dead letters, oldest first (by the time they were dead-lettered), filtered."""
        self._check_open()
        return await self.shielded(list_dead_letters(self.topology, topic, group, reason, limit))

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        self._check_open()
        return await self.shielded(find_dead_letter(self.topology, dead_letter_id))

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        """Send dead letters back to their group's queue (same id and key, attempts reset).

        Every id is found first (its queue read and held); an unknown one moves
        nothing. Each record is removed after its message is confirmed in the group.
        """
        self._check_open()
        partitions, mode = self.settings.partitions, self.internal_mode
        return await self.shielded(
            replay_dead_letters(self.topology, partitions, mode, dead_letter_ids)
        )

    # -- stats ---------------------------------------------------------------------------

    async def stats(self) -> Sequence[GroupStats]:
        """One row per (topic, group) of the catalog, sorted; see the module's LIMITS."""
        self._check_open()
        return await self.shielded(self._stats())

    async def _stats(self) -> list[GroupStats]:
        names, catalog = self.topology.names, await self.topology.catalog()
        partitions = {(t, g): n for t in catalog.topics() for g, n in catalog.groups(t).items()}
        wanted: list[str] = []
        for topic in catalog.topics():
            wanted.append(names.hold(topic))
            wanted.extend(names.bucket(topic, None, k) for k in catalog.buckets(topic, None))
        for (topic, group), n in partitions.items():
            wanted.extend(group_queues(names, topic, group, n))
            wanted.append(names.dead(topic, group))
            wanted.extend(names.bucket(topic, group, k) for k in catalog.buckets(topic, group))
        counts = await self.topology.counts(wanted)

        def count(*queues: str) -> int:
            return sum(counts.get(queue, 0) for queue in queues)

        local: dict[tuple[str, str], list[SubscriptionState]] = defaultdict(list)
        for state in self._states:
            local[(state.subscription.topic, state.subscription.group)].append(state)
        now = asyncio.get_running_loop().time()
        rows: list[GroupStats] = []
        for topic in catalog.topics():
            topic_delayed = count(
                *(names.bucket(topic, None, k) for k in catalog.buckets(topic, None))
            )
            # A group exists once its dead-letter queue does (declared after every binding).
            groups = {
                group: n
                for group, n in catalog.groups(topic).items()
                if names.dead(topic, group) in counts
            }
            if not groups:
                rows.append(
                    GroupStats(
                        topic=topic,
                        group=None,
                        ready=count(names.hold(topic)),
                        delayed=topic_delayed,
                        in_flight=0,
                        dead_lettered=0,
                    )
                )
            for group, n in groups.items():
                states = local[(topic, group)]
                buckets = (names.bucket(topic, group, k) for k in catalog.buckets(topic, group))
                rows.append(
                    GroupStats(
                        topic=topic,
                        group=group,
                        ready=count(*group_queues(names, topic, group, n))
                        + sum(s.ready(now) for s in states),
                        delayed=count(*buckets) + topic_delayed,
                        in_flight=sum(s.holding(now) for s in states),
                        dead_lettered=count(names.dead(topic, group)),
                    )
                )
        return rows

    # -- direct replies ------------------------------------------------------------------

    def direct_replies(self) -> RabbitReplies:
        """Replies through direct reply-to (``rabbitmq_replies``): no reply queue, no
        confirm, no ack on the way back. One reply path (and reply channel) per broker."""
        replies: RabbitReplies | None = getattr(self, "_direct_replies", None)
        if replies is None:
            replies = self._direct_replies = RabbitReplies(self)
        return replies


def _unknown(topic: str, cause: str) -> PublishOutcomeUnknownError:
    return PublishOutcomeUnknownError(
        f"publish to {topic!r}: the outcome is unknown ({cause}); the message may or may not "
        f"be stored. Publish it again if it must arrive: its id lets consumers drop the copy"
    )


async def purge_namespace(url: str, namespace: str) -> None:
    """Delete every exchange and queue the backend created under ``namespace`` on ``url``.

    Reads the namespace's catalog, deletes what it names (deleting something
    already gone is fine), then the catalog itself. Consumers still attached
    to those queues are cancelled by the broker.

    Raises:
        ConfigurationError: the namespace name is invalid.
        BrokerUnavailableError: RabbitMQ cannot be reached.
    """
    check_name("namespace", namespace)
    names = Names(namespace)
    with amqp_errors(f"purging namespace {namespace!r}", url):
        connection = await aiormq.connect(url.split("?", 1)[0])
        try:
            channel = await connection.channel(publisher_confirms=False)
            entries = await _read_catalog(connection, names.catalog)
            for entry in entries:
                for queue in _queues_of(names, entry):
                    await channel.queue_delete(queue)
                if entry.kind == "topic":
                    await channel.exchange_delete(names.topic_exchange(entry.topic))
                    await channel.exchange_delete(names.unrouted_exchange(entry.topic))
            await channel.exchange_delete(names.delay_exchange)
            await channel.queue_delete(names.catalog)
        finally:
            await connection.close()


def _queues_of(names: Names, entry: Entry) -> list[str]:
    """The queues a catalog entry names."""
    if entry.kind == "bucket" and entry.bucket is not None:
        return [names.bucket(entry.topic, entry.group, entry.bucket)]
    if entry.kind == "group" and entry.group is not None:
        return list(group_queues(names, entry.topic, entry.group, entry.partitions))
    if entry.kind == "dead" and entry.group is not None:
        return [names.dead(entry.topic, entry.group)]
    if entry.kind == "topic":
        return [names.hold(entry.topic)]
    return []


async def _read_catalog(connection: Any, queue: str) -> list[Entry]:
    """Every catalog entry, read on a channel of its own that hands them back as it closes."""
    channel = await connection.channel(publisher_confirms=False)
    entries: list[Entry] = []
    try:
        while True:
            try:
                message = await channel.basic_get(queue, no_ack=False)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return entries
            if message.delivery_tag is None:
                return entries
            entry = Entry.parse(message.body)
            if entry is not None:
                entries.append(entry)
    finally:
        if not channel.is_closed:
            await channel.close()
