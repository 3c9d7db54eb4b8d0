"""The NATS JetStream backend: ``nats://host:4222`` (NATS 2.9 or later, JetStream on).

The model on JetStream's primitives (docs/backends/nats.md has the long form):

* a topic is a file-stored stream with *interest* retention: a message stays
  while some consumer still has to ack it and goes once every one did, so
  nothing grows once every group acked;
* a group is a durable pull consumer of that stream (explicit acks, AckWait as
  the lease, no MaxDeliver: the consumer middleware dead-letters at
  ``max_attempts``, and a server-side limit would strand messages silently);
* while a topic has no group, a consumer named ``KEEP`` holds its messages
  (interest retention drops messages nobody is interested in, but the contract
  keeps them for the first group); the first group deletes it, and a ``latest``
  group's start drops what it held, as the contract says;
* ``publish`` returns on JetStream's ack (PubAck) and de-duplicates by the
  CloudEvent's source and id within ``duplicate_window`` (``Nats-Msg-Id``);
* delays, attempts, first-failure times, per-key order, dead letters and replay
  to one group are built on top, in ``nats_reader`` and ``nats_state``.

Durability, stated loudly: JetStream acks a publish once the message is written
to its store files, but fsyncs them only every 2 minutes, so an OS crash or a
power loss can lose acknowledged messages of that window (Jepsen, NATS 2.12.1;
RELIABILITY.md §1.1). A killed server process loses nothing (the fault tests kill
one). NATS 2.9 cannot shorten the window; later servers can, with
``jetstream { sync_interval: always }`` (an fsync per write, slower). With
``replicas=3`` on a cluster, one machine's crash loses nothing acknowledged, but
a coordinated power loss still can.

Limits: a settle sent just before the lease runs out may reach the server after
it handed the message to another consumer (JetStream's documented race): the
effect is a duplicate, never a loss. Stats count messages parked behind their
key, and expired leases not yet redelivered, as in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Literal
from urllib.parse import unquote

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.errors import ConfigurationError

try:
    import nats.errors
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the NATS backend needs nats-py: pip install 'wirework[nats]'"
    ) from exc

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
)
from wirework.brokers.nats_client import (
    STREAM_STORE_FULL,
    Connection,
    JetStreamRefusedError,
    Lost,
    NotSent,
    Stored,
)
from wirework.brokers.nats_delivery import Group, NatsDelivery
from wirework.brokers.nats_reader import Reader
from wirework.brokers.nats_replies import NatsReplies
from wirework.brokers.nats_state import Stores
from wirework.brokers.nats_stats import Stats
from wirework.brokers.nats_topology import Topology
from wirework.brokers.nats_wire import (
    BLOCK_FRAME,
    H_EXPECTED_STREAM,
    H_KEY,
    H_MSG_ID,
    H_NOT_BEFORE,
    Names,
    header_block,
    key_header,
)
from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.envelope import STRUCTURED_CONTENT_TYPE, WireMessage
from wirework.errors import (
    BrokerClosedError,
    BrokerUnavailableError,
    DeadLetterNotFoundError,
    MessageTooLargeError,
    PublishOutcomeUnknownError,
    QueueFullError,
)

log = logging.getLogger("wirework.brokers.nats")

#: Bytes of a message's max_payload kept free so that any message accepted can later be
#: dead-lettered whole (the record adds the error and the failure times).
DEAD_LETTER_RESERVE = 8 * 1024

#: Longest namespace: every server-side name starts with it.
MAX_NAMESPACE = 64

#: Topics whose checked name and subject a broker keeps (publishing looks them up).
_CHECKED_MAX = 10_000


class NatsSettings(BaseSettings):
    """Options of ``nats://`` (query string, keyword or ``WIREWORK_NATS_*`` variables)."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_NATS_", extra="forbid")

    namespace: str = "wirework"
    """Prefix of every stream, consumer and subject this broker creates."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    """Largest message publish accepts (headers included); the server's max_payload,
    less 8 KiB kept for dead-letter records, applies too."""
    publish_timeout: float = Field(default=5.0, gt=0)
    """Seconds a publish may take, retries after a dropped connection included."""
    on_disconnect: Literal["fail", "wait"] = "fail"
    """While disconnected, publish fails at once (fail) or waits up to publish_timeout."""
    connect_timeout: float = Field(default=2.0, gt=0)
    api_timeout: float = Field(default=5.0, gt=0)
    """Seconds a JetStream request (ack, read, create) may take before it counts as lost."""
    reconnect_initial_backoff: float = Field(default=0.1, gt=0)
    reconnect_max_backoff: float = Field(default=5.0, gt=0)
    """Reconnection waits double from the initial to the max backoff (with jitter)."""
    ping_interval: float = Field(default=20.0, gt=0)
    """Seconds between pings; two unanswered ones count as a lost connection."""
    replicas: int = Field(default=1, ge=1, le=5)
    """Copies of every stream on a JetStream cluster (1 on a single server)."""
    duplicate_window: float = Field(default=120.0, gt=0)
    """Seconds a topic remembers published ids: a copy with the same id is dropped."""
    deduplicate: bool = True
    """De-duplicate publishes by CloudEvent source and id (Nats-Msg-Id)."""
    key_state_ttl: float = Field(default=86_400.0, gt=0)
    """Seconds an idle key's cursor is kept (the group's ack floor stands in after)."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value) or len(value) > MAX_NAMESPACE:
            raise ValueError(f"use 1-{MAX_NAMESPACE} characters from A-Z a-z 0-9 . _ -")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NatsSettings:
        if self.reconnect_max_backoff < self.reconnect_initial_backoff:
            raise ValueError("reconnect_max_backoff must be at least reconnect_initial_backoff")
        if self.publish_timeout >= self.duplicate_window:
            raise ValueError(
                "publish_timeout must be below duplicate_window, so a retried publish "
                "is recognised as a copy"
            )
        return self


class NatsBroker(Broker, DeadLetterStore, Inspectable, GroupAdmin):
    """The broker contract on NATS JetStream; open with ``connect("nats://host:4222")``.

    Attributes:
        stale_settles: settles ignored because the delivery's lease had run out or
            its subscription was left.
    """

    def __init__(
        self, url: str, *, settings: NatsSettings | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings or NatsSettings()
        self.max_message_bytes = self.settings.max_message_bytes
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.names = Names(self.settings.namespace)
        self.connection = Connection(url, self.settings)
        self.stores = Stores(self.connection, self.names, self.settings)
        self.topology = Topology(self.connection, self.names, self.stores, self.settings)
        self.stale_settles = 0
        self._checked: set[str] = set()
        """Topic names checked and published to (their streams are known to exist)."""
        self._subjects: dict[str, str] = {}
        self._readers: set[Reader] = set()
        self._closed = False

    def check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"the NATS broker on {self.connection.where} was closed")

    async def max_payload(self) -> int:
        """The server's largest message, headers included."""
        return int((await self.connection.client()).max_payload)

    # -- groups -------------------------------------------------------------------------

    async def declare_group(self, subscription: Subscription) -> None:
        """Create the group now, at its start position, as ``subscribe`` would on first use."""
        self.check_open()
        await self.topology.join(subscription)

    async def delete_group(self, topic: str, group: str) -> None:
        """Forget a group and what only it held; with the last group, the topic goes too.

        A publish to the topic in the instant its last group is deleted can be
        lost (see ``nats_topology``): delete a live topic's last group only when
        nothing publishes to it any more (a stopped instance's reply topic).
        """
        self.check_open()
        if NAME_PATTERN.fullmatch(topic) and NAME_PATTERN.fullmatch(group):
            await self.topology.delete_group(topic, group)

    async def rejoin(self, subscription: Subscription) -> Group:
        """Join again after the group's consumer (or the topic's stream) disappeared."""
        self.topology.forget(subscription.topic)
        return await self.topology.join(subscription)

    # -- publish ------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self.check_open()
        if topic not in self._checked:
            check_name("topic", topic)
        self.check_size(topic, message)
        if not delay >= 0:
            raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        stream = self.topology.known(topic)
        while stream is None:
            try:
                stream = await self.topology.topic(topic)
            except BrokerUnavailableError:  # nothing was sent
                waiting = self.settings.on_disconnect == "wait"
                if not (waiting and await self.connection.wait_up(deadline - loop.time())):
                    raise
        if len(self._checked) < _CHECKED_MAX:
            self._checked.add(topic)
        control = {H_MSG_ID: self._message_id(message), H_EXPECTED_STREAM: stream}
        if key is not None:
            control[H_KEY] = key_header(key)
        if delay > 0:
            control[H_NOT_BEFORE] = repr(self.clock.now().timestamp() + delay)
        block = header_block(message, control)
        limit = await self.max_payload() - DEAD_LETTER_RESERVE
        size = len(message.body) + len(block) - BLOCK_FRAME  # as header_bytes counts
        if size > limit:
            raise MessageTooLargeError(size, limit, topic=topic)
        if key is None and delay <= 0:
            subject = self._subjects.get(topic) or self._subject(topic)
        else:
            subject = self.names.message_subject(topic, key, kind="d" if delay > 0 else "n")
        await self._store(topic, subject, message.body, block, deadline=deadline)

    def _subject(self, topic: str) -> str:
        """The subject of a message published now without a key, kept per topic."""
        subject = self.names.message_subject(topic, None)
        if len(self._subjects) < _CHECKED_MAX:
            self._subjects[topic] = subject
        return subject

    def _message_id(self, message: WireMessage) -> str:
        """Nats-Msg-Id: the CloudEvent's source and id, so a republished event counts once."""
        if not self.settings.deduplicate:
            return f"ww-{uuid.uuid4().hex}"
        headers = message.headers
        event_id = headers.get("ce-id")
        if event_id is not None and "".join(headers).islower():
            # Binary mode with lower-case names, as wirework writes it: what the general
            # case below finds, without copying the headers or looking at the body.
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != STRUCTURED_CONTENT_TYPE:
                return _digest(unquote(headers.get("ce-source", "")), unquote(event_id))
        event_id = message.message_id
        if event_id is None:
            return f"ww-{uuid.uuid4().hex}"
        lowered = {name.lower(): value for name, value in headers.items()}
        source = unquote(lowered.get("ce-source", ""))
        if "ce-id" not in lowered:
            with contextlib.suppress(ValueError, AttributeError):
                source = str(json.loads(message.body).get("source", ""))
        return _digest(source, event_id)

    async def _store(
        self,
        topic: str,
        subject: str,
        body: bytes,
        block: bytes,
        *,
        deadline: float | None = None,
    ) -> None:
        """Publish to JetStream and return once it acked; retried with the same id.

        ``block`` is the message's header block (``nats_wire.header_block``).

        A publish that never left (the connection was down) raises the definite
        BrokerUnavailableError; one that left without an answer raises BrokerError,
        as it may have been stored.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.settings.publish_timeout
        sent = False
        while True:
            self.check_open()
            remaining = deadline - loop.time()
            if not self.connection.up:
                waiting = self.settings.on_disconnect == "wait" and remaining > 0
                if waiting and await self.connection.wait_up(remaining):
                    continue
                raise self._unknown(topic) if sent else self._unavailable(topic)
            failed: Exception | None = None
            with self.connection.translate(f"publishing to {topic!r}"):
                try:
                    reply = await self.connection.request(
                        subject, body, headers=block, timeout=max(0.001, remaining)
                    )
                except (NotSent, Lost, TimeoutError, nats.errors.NoRespondersError) as exc:
                    failed = exc
            if isinstance(failed, NotSent):
                continue  # the connection went down before sending: look again
            if isinstance(failed, nats.errors.NoRespondersError):
                # Nothing stored it: the stream was deleted. Create it again and retry.
                self.topology.forget(topic)
                await self.topology.topic(topic)
                if deadline > loop.time():
                    continue
                raise self._unavailable(topic)
            if failed is not None:
                sent = True
                if self.settings.on_disconnect == "wait" and deadline > loop.time():
                    continue
                raise self._unknown(topic) from failed
            answer = json.loads(reply.data)
            error = answer.get("error")
            if error is None:
                return
            if int(error.get("err_code") or 0) in STREAM_STORE_FULL:
                raise QueueFullError(f"topic {topic!r} is full on the server: {error}")
            raise JetStreamRefusedError(f"publishing to {topic!r}", error)

    def _unavailable(self, topic: str) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"not connected to NATS at {self.connection.where}: the message for {topic!r} "
            f"was not sent; retry later (or set on_disconnect='wait')"
        )

    def _unknown(self, topic: str) -> PublishOutcomeUnknownError:
        """The one BrokerUnavailableError that does not promise nothing was stored."""
        return PublishOutcomeUnknownError(
            f"the connection to NATS at {self.connection.where} failed before JetStream "
            f"confirmed the message for {topic!r}: it may or may not be stored; publishing "
            f"the same CloudEvent (same source and id) again within "
            f"{self.settings.duplicate_window:g}s is safe, JetStream drops the copy"
        )

    # -- subscribe ----------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> AsyncGenerator[NatsDelivery, None]:
        """Deliveries for one consumer of the group (see ``Broker.subscribe``).

        Joining waits for the server while it is unreachable (logging a warning),
        so a consumer started before the broker comes up starts with it.

        Raises:
            BrokerClosedError: the broker was closed.
        """
        self.check_open()
        return self._deliveries(subscription)

    async def _deliveries(self, subscription: Subscription) -> AsyncGenerator[NatsDelivery, None]:
        group = await self._join_patiently(subscription)
        if group is None:
            return  # closed while joining
        reader = Reader(self, subscription, group)
        self._readers.add(reader)
        try:
            await reader.start()
            while (delivery := await reader.next()) is not None:
                yield delivery
        finally:
            self._readers.discard(reader)
            await reader.stop()

    async def _join_patiently(self, subscription: Subscription) -> Group | None:
        pause = self.settings.reconnect_initial_backoff
        while not self._closed:
            try:
                return await self.topology.join(subscription)
            except BrokerUnavailableError as exc:
                if self._closed:
                    break
                log.warning(
                    "cannot join %s/%s yet: %s", subscription.topic, subscription.group, exc
                )
            await asyncio.sleep(pause)
            pause = min(self.settings.reconnect_max_backoff, pause * 2)
        return None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            await reader.stop()
        await self.connection.aclose()

    # -- dead letters -------------------------------------------------------------------

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: DeadLetterReason | None = None,
        limit: int = 100,
    ) -> Sequence[DeadLetter]:
        self.check_open()
        if limit <= 0 or any(
            n is not None and not NAME_PATTERN.fullmatch(n) for n in (topic, group)
        ):
            return []
        subject = self.names.dlq_filter(topic, group, None if reason is None else reason.value)
        found = await self.connection.scan(await self.stores.ensure("dlq"), subject, limit=limit)
        return [Stores.read_dead_letter(stored) for stored in found]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        self.check_open()
        stored: Stored | None = None
        if dead_letter_id.isdigit() and int(dead_letter_id) > 0:
            seq = int(dead_letter_id)
            stored = await self.connection.direct_get(await self.stores.ensure("dlq"), seq=seq)
        if stored is None or str(stored.seq) != dead_letter_id:
            raise DeadLetterNotFoundError(f"no dead letter with id {dead_letter_id!r}")
        return Stores.read_dead_letter(stored)

    async def replay(self, dead_letter_ids: Sequence[str]) -> int:
        """Publish dead letters again to their group alone, then remove their records.

        The two steps are not one transaction: a crash between them leaves the
        message replayed and its record kept; replaying it again within
        ``duplicate_window`` is recognised as a copy and not delivered twice.
        """
        self.check_open()
        records = [await self.dead_letter(i) for i in dict.fromkeys(dead_letter_ids)]
        for record in records:
            stream = await self.topology.topic(record.topic)
            control = {
                H_MSG_ID: f"replay-{self.names.dlq_stream}-{record.id}",
                H_EXPECTED_STREAM: stream,
            }
            if record.key is not None:
                control[H_KEY] = key_header(record.key)
            subject = self.names.message_subject(
                record.topic, record.key, kind="r", group=record.group
            )
            block = header_block(record.message, control)
            await self._store(record.topic, subject, record.message.body, block)
            await self.connection.delete_message(self.names.dlq_stream, int(record.id))
        return len(records)

    # -- stats --------------------------------------------------------------------------

    async def stats(self) -> Sequence[GroupStats]:
        """One row per (topic, group); what is approximate is said in ``nats_stats``."""
        self.check_open()
        return await Stats(self.connection, self.names, self.stores, self.clock).rows()

    # -- direct replies -----------------------------------------------------------------

    def direct_replies(self) -> NatsReplies:
        """Replies as core publishes to a caller's own inbox subject (``nats_replies``):
        no reply stream, PubAck, consumer or ack on the way back."""
        return NatsReplies(self)


def _digest(source: str, event_id: str) -> str:
    digest = hashlib.sha256(f"{source}\n{event_id}".encode("utf-8", "surrogatepass"))
    return f"ce-{digest.hexdigest()[:40]}"


async def purge_namespace(url: str, namespace: str) -> None:
    """Delete every stream (with its consumers and messages) of ``namespace`` on the server.

    For tests and for tearing down an application's state; there is no undo.
    """
    try:
        settings = NatsSettings(namespace=namespace)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid namespace {namespace!r}: {exc}") from exc
    names = Names(settings.namespace)
    connection = Connection(url, settings)
    try:
        for info in await connection.stream_list(names.everything):
            name = info["config"]["name"]
            with contextlib.suppress(JetStreamRefusedError):
                await connection.api(f"STREAM.DELETE.{name}", None, what=f"deleting {name}")
    finally:
        await connection.aclose()
