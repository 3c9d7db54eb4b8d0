"""Server-side objects of the RabbitMQ backend: declaring them, listing them, reading queues.

RabbitMQ without its management plugin cannot list queues over AMQP, so a
namespace keeps a *catalog*: a durable queue with one small message per topic,
group and delay queue it created. ``stats``, the dead-letter listing and
``purge_namespace`` read it; an entry is written before the objects it names,
so the catalog never misses an object (it may name one that expired).

Reading a queue without consuming it (the catalog, a group's dead letters) is
a *browse*: ``basic.get`` everything on a private channel, then hand it all
back with one ``basic.nack(multiple, requeue)``. A quorum queue puts returned
messages back at the head in the order they were taken, so the order stays.
While a browse runs its messages are invisible to other readers, which is why
each broker serialises its browses per queue; two processes browsing the same
queue at the same instant may each see part of it (documented).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiormq import exceptions as amqp
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from wirework.brokers.rabbitmq_link import (
    AMQP_ERRORS,
    Link,
    amqp_errors,
)
from wirework.brokers.rabbitmq_names import (
    ANY,
    DELAY_HEADER,
    Names,
    bucket_ttl_ms,
    partition_kind,
    split_headers,
)
from wirework.errors import BrokerError, BrokerUnavailableError, PublishOutcomeUnknownError

if TYPE_CHECKING:
    from wirework.brokers.rabbitmq import RabbitSettings

#: A delay queue lives this much longer than its TTL after its last declaration (x-expires),
#: and is declared again before a publish into it once this much younger lease has passed.
_BUCKET_GRACE_MS = 300_000
_BUCKET_RENEW_SECONDS = 60.0


class MissingError(BrokerError):
    """The exchange or queue a publish went to is gone (deleted behind our back).

    ``maybe_stored``: the channel died of it (404), so publishes in flight on
    that channel lost their confirms too; a returned message was not stored.
    """

    def __init__(self, message: str, *, maybe_stored: bool) -> None:
        super().__init__(message)
        self.maybe_stored = maybe_stored


@dataclass
class Progress:
    """One publish's deadline, and whether it got as far as writing the message (after which
    its outcome may be unknown); shared across the retries of one publish.

    One deadline (a float, loop time) rather than an ``asyncio.timeout`` around the
    whole publish: the common publish (topic declared, channel open, a place free in
    the window) then pays for one timer only, the one aiormq sets on the confirm, and
    the rare waits (a connection, a declaration) are bounded by ``timeout_at`` here.
    """

    deadline: float
    """When ``publish_timeout`` runs out (loop time); moved on by the wait for a turn."""
    until: Callable[[], float | None] | None = None
    """The message's own deadline (loop time), the longest it waits for its turn."""
    sent: bool = False

    def left(self) -> float:
        """Seconds to the deadline; raises ``TimeoutError`` once it passed."""
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError
        return left


@dataclass(frozen=True)
class Mode:
    """How an operation meets an outage: fail at once, or wait up to ``timeout`` seconds."""

    wait: bool
    timeout: float | None


@dataclass(frozen=True)
class Entry:
    """One catalog entry: a topic, a group, a group's dead letters, or a delay queue.

    ``partitions`` is recorded for topics and groups (the keyed queues to delete).
    """

    kind: Literal["topic", "group", "dead", "bucket"]
    topic: str
    group: str | None = None
    bucket: int | None = None
    partitions: int = 0

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "kind": self.kind,
                "topic": self.topic,
                "group": self.group,
                "bucket": self.bucket,
                "partitions": self.partitions,
            }
        )

    @classmethod
    def parse(cls, body: bytes) -> Entry | None:
        try:
            data = orjson.loads(body)
            kind = data["kind"]
            if kind not in ("topic", "group", "dead", "bucket"):
                return None
            return cls(kind, data["topic"], data["group"], data["bucket"], int(data["partitions"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # not ours: ignore rather than break every listing


@dataclass
class Catalog:
    """What a namespace holds, as read from its catalog queue."""

    entries: set[Entry] = field(default_factory=set)

    def topics(self) -> list[str]:
        return sorted({e.topic for e in self.entries if e.kind == "topic"})

    def groups(self, topic: str) -> dict[str, int]:
        """The groups of a topic by name, with their partition count (the highest recorded)."""
        found: dict[str, int] = {}
        for e in self.entries:
            if e.kind == "group" and e.topic == topic and e.group is not None:
                found[e.group] = max(found.get(e.group, 0), e.partitions)
        return dict(sorted(found.items()))

    def dead(self) -> list[tuple[str, str]]:
        """(topic, group) of every dead-letter queue, also of groups deleted since."""
        return sorted(
            {(e.topic, e.group) for e in self.entries if e.kind == "dead" and e.group is not None}
        )

    def buckets(self, topic: str, group: str | None) -> list[int]:
        return sorted(
            {
                e.bucket
                for e in self.entries
                if e.kind == "bucket" and e.topic == topic and e.group == group
                if e.bucket is not None
            }
        )


@dataclass
class Browse:
    """Messages taken (unacked) from a queue by a browse; ``take`` removes one for good."""

    channel: AbstractChannel
    messages: list[DeliveredMessage]
    url: str

    async def take(self, message: DeliveredMessage) -> None:
        tag = message.delivery_tag
        if tag is None:  # pragma: no cover - basic.get-ok always has one
            return
        with amqp_errors("removing a read message", self.url):
            await self.channel.basic_ack(tag)
        self.messages.remove(message)


class Topology:
    """Declares a namespace's objects (cached per connection), keeps its catalog, reads queues.

    A declaration runs as background work of the broker, awaited through a
    shield: callers waiting for the same object share it, and a caller that
    is cancelled (a request's deadline) neither aborts it half-way nor closes
    the shared channel under the others, as a cancelled AMQP call would.
    """

    def __init__(
        self,
        link: Link,
        names: Names,
        settings: RabbitSettings,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self._link = link
        self.names = names
        self._settings = settings
        self._spawn = spawn
        self._declared: dict[str, float] = {}
        self._declared_epoch = -1
        self._exchanges: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._known: set[Entry] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    # -- arguments -----------------------------------------------------------------

    def queue_args(self, *, single_active: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self._settings.queue_type}
        if single_active:
            args["x-single-active-consumer"] = True
        return args

    def bucket_args(self, index: int, target_exchange: str) -> dict[str, Any]:
        """A delay queue: per-queue TTL, then dead-lettered to ``target_exchange``.

        With no dead-letter routing key the message keeps its own, so one delay
        queue serves every queue of a group (default exchange, routing key = queue
        name) or every group of a topic (topic exchange, routing key = partition).
        """
        ttl = bucket_ttl_ms(index)
        args = self.queue_args()
        args.update(
            {
                "x-message-ttl": ttl,
                "x-dead-letter-exchange": target_exchange,
                "x-expires": ttl + _BUCKET_GRACE_MS,
            }
        )
        if self._settings.queue_type == "quorum":
            # RELIABILITY.md §1.1: the default DLX is at-most-once; these two make it at-least-once.
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        return args

    # -- declarations ----------------------------------------------------------------

    def _fresh(self, name: str, max_age: float | None = None) -> bool:
        if self._declared_epoch != self._link.epoch:
            self._declared.clear()
            self._declared_epoch = self._link.epoch
        at = self._declared.get(name)
        return at is not None and (max_age is None or time.monotonic() - at < max_age)

    def topic_ready(self, topic: str) -> str | None:
        """The topic's exchange if it was declared on this connection, else None: a plain
        call (no coroutine, no name built), as every publish asks it."""
        exchange = self._exchanges.get(topic)
        if exchange is None:
            exchange = self._exchanges[topic] = self.names.topic_exchange(topic)
        return exchange if self._fresh(exchange) else None

    def forget(self) -> None:
        """Declare everything again on next use (something was deleted behind our back)."""
        self._declared.clear()

    async def _once(
        self, name: str, declare: Callable[[], Awaitable[None]], max_age: float | None = None
    ) -> None:
        """Run ``declare`` unless ``name`` was declared on this connection (within ``max_age``)."""
        if self._fresh(name, max_age):
            return
        task = self._inflight.get(name)
        if task is None:

            async def run() -> None:
                try:
                    await declare()
                    self._declared[name] = time.monotonic()
                finally:
                    self._inflight.pop(name, None)

            task = self._inflight[name] = self._spawn(run())
        await asyncio.shield(task)

    async def ensure_topic(self, topic: str, mode: Mode) -> None:
        names = self.names

        async def declare() -> None:
            await self.register(Entry("topic", topic, partitions=self._settings.partitions), mode)
            channel = await self._link.channel(confirms=False, wait=mode.wait, timeout=mode.timeout)
            with amqp_errors(f"declaring topic {topic!r}", self._link.url):
                unrouted = names.unrouted_exchange(topic)
                await channel.exchange_declare(unrouted, exchange_type="fanout", durable=True)
                await channel.queue_declare(
                    names.hold(topic), durable=True, arguments=self.queue_args()
                )
                await channel.queue_bind(names.hold(topic), unrouted)
                await channel.exchange_declare(
                    names.topic_exchange(topic),
                    exchange_type="direct",
                    durable=True,
                    arguments={"alternate-exchange": unrouted},
                )
                await channel.exchange_declare(
                    names.delay_exchange, exchange_type="headers", durable=True
                )

        await self._once(names.topic_exchange(topic), declare)

    async def ensure_group(self, topic: str, group: str, mode: Mode) -> bool:
        """Declare the group's queues and bindings; True if its queues did not exist before."""
        await self.ensure_topic(topic, mode)
        names = self.names
        keyless = names.group_queue(topic, group, ANY)
        new = not await self.exists(keyless, mode)
        partitions = self._settings.partitions

        async def declare() -> None:
            await self.register(Entry("dead", topic, group), mode)
            await self.register(Entry("group", topic, group, partitions=partitions), mode)
            channel = await self._link.channel(confirms=False, wait=mode.wait, timeout=mode.timeout)
            exchange = names.topic_exchange(topic)
            with amqp_errors(f"declaring group {group!r} of {topic!r}", self._link.url):
                for kind in [*(f"p{i}" for i in range(partitions)), ANY]:
                    queue = names.group_queue(topic, group, kind)
                    args = self.queue_args(single_active=kind != ANY)
                    await channel.queue_declare(queue, durable=True, arguments=args)
                    await channel.queue_bind(queue, exchange, routing_key=kind)
                # Last: once the dead-letter queue exists, every queue is bound (``stats``).
                await channel.queue_declare(
                    names.dead(topic, group), durable=True, arguments=self.queue_args()
                )

        await self._once(keyless, declare)
        return new

    async def ensure_bucket(self, topic: str, group: str | None, index: int, mode: Mode) -> str:
        """The delay queue ``index`` of a topic (group None) or group, declared and bound."""
        names = self.names
        queue = names.bucket(topic, group, index)

        async def declare() -> None:
            await self.register(Entry("bucket", topic, group, index), mode)
            target = names.topic_exchange(topic) if group is None else ""
            channel = await self._link.channel(confirms=False, wait=mode.wait, timeout=mode.timeout)
            with amqp_errors(f"declaring a delay queue of {topic!r}", self._link.url):
                await channel.queue_declare(
                    queue, durable=True, arguments=self.bucket_args(index, target)
                )
                await channel.queue_bind(
                    queue,
                    names.delay_exchange,
                    arguments={"x-match": "all", DELAY_HEADER: queue},
                )

        await self.ensure_topic(topic, mode)
        await self._once(queue, declare, _BUCKET_RENEW_SECONDS)
        return queue

    async def exists(self, queue: str, mode: Mode) -> bool:
        """Whether ``queue`` exists (a passive declare, on a channel a 404 may close)."""
        async with self._link.private_channel(wait=mode.wait) as channel:
            with amqp_errors(f"checking queue {queue!r}", self._link.url):
                try:
                    await channel.queue_declare(queue, passive=True)
                except amqp.ChannelNotFoundEntity:
                    return False
        return True

    async def counts(self, queues: Iterable[str]) -> dict[str, int]:
        """Ready messages per queue (unacked ones are not counted); a missing queue is left out."""
        found: dict[str, int] = {}
        pending = list(dict.fromkeys(queues))
        while pending:
            async with self._link.private_channel() as channel:
                with amqp_errors("counting messages", self._link.url):
                    while pending:
                        try:
                            declared = await channel.queue_declare(pending[0], passive=True)
                        except amqp.ChannelNotFoundEntity:
                            pending.pop(0)
                            break  # the 404 closed the channel: open another
                        found[pending.pop(0)] = declared.message_count or 0
        return found

    # -- the first group takes what the topic held ---------------------------------------

    async def adopt_held(self, topic: str, group: str, start: str, new: bool, mode: Mode) -> None:
        """Messages kept while the topic had no group: a new ``latest`` group drops them, any
        other group takes them into its own queues, in order (one process at a time)."""
        names = self.names
        hold = names.hold(topic)
        if not (new and start == "latest") and not (await self.counts([hold])).get(hold):
            return
        async with self._drain_lock(topic, mode):
            if new and start == "latest":
                async with self._link.private_channel(wait=mode.wait) as channel:
                    with amqp_errors("dropping held messages", self._link.url):
                        await channel.queue_purge(hold)
                return
            async with self.browse(hold) as browse:
                for message in list(browse.messages):
                    headers = dict(message.header.properties.headers or {})
                    _, state, _ = split_headers(headers)
                    key = state.get("key")
                    kind = partition_kind(
                        None if key is None else str(key), self._settings.partitions
                    )
                    queue = names.group_queue(topic, group, kind)
                    await self.send("", queue, message.body, headers, mode)
                    await browse.take(message)

    @contextlib.asynccontextmanager
    async def _drain_lock(self, topic: str, mode: Mode) -> AsyncIterator[None]:
        """A lock across processes: an exclusive queue, gone with its connection if we die."""
        lock = self.names.lock(topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout
        while True:
            async with self._link.private_channel(wait=mode.wait) as channel:
                try:
                    await channel.queue_declare(
                        lock, exclusive=True, arguments={"x-queue-type": "classic"}
                    )
                    break
                except amqp.ChannelLockedResource:
                    pass  # another process drains: wait for it
                except AMQP_ERRORS as exc:
                    raise BrokerUnavailableError(f"taking the lock of {topic!r}: {exc!r}") from exc
            if loop.time() > deadline:
                raise BrokerUnavailableError(
                    f"another process held the lock of topic {topic!r} for over "
                    f"{self._settings.publish_timeout}s; retry later"
                )
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            async with self._link.private_channel() as channel:
                with contextlib.suppress(*AMQP_ERRORS):
                    await channel.queue_delete(lock)

    # -- deleting --------------------------------------------------------------------

    async def delete_group(self, topic: str, group: str) -> None:
        """Delete a group's queues (its dead letters stay while there are any), and the topic's
        objects with its last group; the catalog forgets them afterwards."""
        names, catalog = self.names, await self.catalog()
        groups = catalog.groups(topic)
        if group not in groups:
            return
        dead = names.dead(topic, group)
        keep_dead = bool((await self.counts([dead])).get(dead))
        gone = {e for e in catalog.entries if e.topic == topic and e.group == group}
        queues = [
            *group_queues(names, topic, group, groups[group]),
            *(names.bucket(topic, group, k) for k in catalog.buckets(topic, group)),
        ]
        if keep_dead:
            gone = {e for e in gone if e.kind != "dead"}
        else:
            queues.append(dead)
        exchanges: list[str] = []
        if set(groups) == {group}:  # the last group: the topic goes too
            gone |= {e for e in catalog.entries if e.topic == topic and e.kind != "dead"}
            gone -= {e for e in catalog.entries if e.kind == "dead" and keep_dead}
            queues += [
                names.hold(topic),
                *(names.bucket(topic, None, k) for k in catalog.buckets(topic, None)),
            ]
            exchanges += [names.topic_exchange(topic), names.unrouted_exchange(topic)]
        async with self._link.private_channel() as channel:
            with amqp_errors(f"deleting group {group!r} of {topic!r}", self._link.url):
                for queue in queues:
                    await channel.queue_delete(queue)
                for exchange in exchanges:
                    await channel.exchange_delete(exchange)
        await self.unregister(gone)
        self.forget()

    # -- the catalog ------------------------------------------------------------------

    async def register(self, entry: Entry, mode: Mode) -> None:
        """Add ``entry`` to the catalog unless it is there (read once per broker, then cached)."""
        if self._known is None:
            self._known = (await self.catalog()).entries
        if entry in self._known:
            return
        self._known = (await self.catalog()).entries  # another process may have added it
        if entry in self._known:
            return
        await self.send("", self.names.catalog, entry.body(), {}, mode)
        self._known.add(entry)

    async def unregister(self, entries: set[Entry]) -> None:
        """Remove entries (every copy of each) from the catalog."""
        async with self.browse(self.names.catalog, declare=True) as browse:
            for message in list(browse.messages):
                if Entry.parse(message.body) in entries:
                    await browse.take(message)
        if self._known is not None:
            self._known -= entries

    async def catalog(self) -> Catalog:
        async with self.browse(self.names.catalog, declare=True) as browse:
            entries = {Entry.parse(m.body) for m in browse.messages}
        return Catalog({e for e in entries if e is not None})

    @contextlib.asynccontextmanager
    async def browse(self, queue: str, *, declare: bool = False) -> AsyncIterator[Browse]:
        """Every message of ``queue``, held unacked for the block and handed back after it.

        ``declare`` declares the queue first: a ``basic.get`` on a quorum queue that
        another channel is still creating fails the whole connection ("noproc"),
        while a declaration waits until the queue is up.
        """
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock, self._link.private_channel() as channel:
            taken: list[DeliveredMessage] = []
            try:
                with amqp_errors(f"reading queue {queue!r}", self._link.url):
                    if declare:
                        await channel.queue_declare(
                            queue, durable=True, arguments=self.queue_args()
                        )
                    while True:
                        try:
                            message = await channel.basic_get(queue, no_ack=False)
                        except amqp.ChannelNotFoundEntity:
                            break  # no such queue: nothing in it
                        if not isinstance(message.delivery, Basic.GetOk):
                            break
                        taken.append(message)
                yield Browse(channel, taken, self._link.url)
            finally:
                if taken and not channel.is_closed:
                    last = max(m.delivery_tag or 0 for m in taken)
                    with contextlib.suppress(*AMQP_ERRORS):
                        await channel.basic_nack(last, multiple=True, requeue=True)

    # -- sending ----------------------------------------------------------------------

    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any],
        mode: Mode,
        progress: Progress | None = None,
    ) -> None:
        """Publish persistently, once its turn comes in the link's window, and wait for the
        broker's confirm. ``headers`` is sent as it is (not copied: nothing writes to it).

        Raises:
            BrokerUnavailableError: definitely not stored (no connection, or nacked).
            DeadlineExceededError: ``progress.until`` passed while it waited its turn; not sent.
            MissingError: the exchange or queue is gone, or nothing took the message.
            PublishOutcomeUnknownError: sent, but the connection failed before the confirm,
                or no confirm came by ``progress.deadline`` (without ``progress``: within
                ``publish_timeout`` of the send).
            TimeoutError: ``progress.deadline`` passed before anything was sent.
        """
        link = self._link
        channel = link.open_channel(confirms=True)
        if channel is None:
            channel = await self._confirming(mode, progress)
        properties = Basic.Properties(delivery_mode=2, headers=headers)
        window = link.window
        if not window.take():
            until = progress.until if progress is not None else None
            waited = await window.wait(until() if until is not None else None)
            if progress is not None:
                progress.deadline += waited  # the turn's wait does not count
        try:
            if channel.is_closed:  # gone while this waited its turn
                channel = await self._confirming(mode, progress)
            if progress is None:
                # Copies, dead letters, the catalog: the place in the window is still given
                # back within publish_timeout of the send, so the window moves.
                limit = self._settings.publish_timeout
            else:
                limit = progress.left()
                progress.sent = True
            await self._confirmed(channel, exchange, routing_key, body, properties, limit)
        finally:
            window.give()

    async def _confirming(self, mode: Mode, progress: Progress | None) -> AbstractChannel:
        """The confirming channel when it has to be (re)opened, within the publish's deadline."""
        if progress is None:
            return await self._link.channel(confirms=True, wait=mode.wait, timeout=mode.timeout)
        async with asyncio.timeout_at(progress.deadline):
            return await self._link.channel(confirms=True, wait=mode.wait, timeout=progress.left())

    async def _confirmed(
        self,
        channel: AbstractChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        limit: float,
    ) -> None:
        try:
            # aiormq's own timeout bounds the confirm: one timer per publish, not two.
            confirm = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=limit,
            )
        except amqp.ChannelInvalidStateError as exc:  # closed before anything was written
            raise BrokerUnavailableError(f"RabbitMQ connection lost: {exc}") from exc
        except TimeoutError as exc:
            raise PublishOutcomeUnknownError(
                f"RabbitMQ did not confirm within publish_timeout "
                f"({self._settings.publish_timeout}s)"
            ) from exc
        except amqp.PublishError as exc:
            raise MissingError(
                f"nothing took the message sent to {exchange!r}", maybe_stored=False
            ) from exc
        except amqp.DeliveryError as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ refused responsibility for a message (basic.nack): {exc}; "
                f"nothing was stored, retry later"
            ) from exc
        except amqp.ChannelNotFoundEntity as exc:
            raise MissingError(
                f"{exchange or routing_key!r} does not exist: {exc}", maybe_stored=True
            ) from exc
        except AMQP_ERRORS as exc:
            raise PublishOutcomeUnknownError(
                f"the connection broke before RabbitMQ confirmed: {exc!r}"
            ) from exc
        if not isinstance(confirm, Basic.Ack):  # pragma: no cover - confirms are always on
            raise BrokerUnavailableError(f"RabbitMQ did not confirm a publish: {confirm!r}")


def group_queues(names: Names, topic: str, group: str, partitions: int) -> Sequence[str]:
    """The keyless queue and the partitions of a group, in that order."""
    kinds = [ANY, *(f"p{i}" for i in range(partitions))]
    return [names.group_queue(topic, group, kind) for kind in kinds]
