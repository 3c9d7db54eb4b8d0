"""Topics and groups on JetStream: streams, durable consumers, and the keeper.

A topic is a file-stored stream with *interest* retention: a message stays while
some consumer still has to ack it, and goes once every one did. JetStream drops
a message published while a stream has no consumer at all (it acks it, but
keeps nothing), while the contract keeps such a message for the first group.
So a topic without groups gets a consumer named ``KEEP`` that nobody reads:
it holds every message until a group joins; the joining group deletes it, and
deleting it drops what only it held, which is what creating a ``latest`` group
must do. Whoever creates the keeper looks for groups afterwards, and whoever
creates a group deletes the keeper afterwards, so in every interleaving a
keeper never outlives the first group.

A group is a durable pull consumer: explicit acks, AckWait as the lease, no
MaxDeliver (the consumer middleware dead-letters at ``max_attempts``; a server
limit would leave a message stranded, neither delivered nor dead-lettered),
no MaxAckPending (delayed and handed-back messages count as pending on the
server; the per-subscription ``prefetch`` bound is kept by the reader). A
``latest`` group starts at the stream's next sequence, which it records.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from wirework.brokers.base import Subscription
from wirework.brokers.nats_client import (
    CONSUMER_NOT_FOUND,
    STREAM_NOT_FOUND,
    Connection,
    JetStreamRefusedError,
)
from wirework.brokers.nats_delivery import Group
from wirework.brokers.nats_state import Stores
from wirework.brokers.nats_wire import KEEPER, Names

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsSettings


class Topology:
    """Creates and deletes one namespace's topics and groups, remembering what exists."""

    def __init__(
        self, connection: Connection, names: Names, stores: Stores, settings: NatsSettings
    ) -> None:
        self.connection = connection
        self.names = names
        self.stores = stores
        self.settings = settings
        self._topics: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def forget(self, topic: str) -> None:
        """The topic's stream may be gone (deleted elsewhere): look again next time."""
        self._topics.pop(topic, None)

    def known(self, topic: str) -> str | None:
        """The topic's stream if this broker already found or created it (no call)."""
        return self._topics.get(topic)

    async def topic(self, topic: str) -> str:
        """The topic's stream, created (with its keeper) if it does not exist yet."""
        stream = self._topics.get(topic)
        if stream is not None:
            return stream
        async with self._locks.setdefault(topic, asyncio.Lock()):
            if topic not in self._topics:
                self._topics[topic] = await self._create_topic(topic)
            return self._topics[topic]

    async def _create_topic(self, topic: str) -> str:
        stream = self.names.topic_stream(topic)
        try:
            info = await self.connection.api(
                f"STREAM.INFO.{stream}", None, what=f"reading topic {topic!r}"
            )
            consumers = int(info["state"].get("consumer_count", 0))
        except JetStreamRefusedError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
            await self.connection.ensure_stream(
                {
                    "name": stream,
                    "description": topic,
                    "subjects": [self.names.topic_filter(topic)],
                    "retention": "interest",
                    "storage": "file",
                    "num_replicas": self.settings.replicas,
                    "discard": "old",
                    "duplicate_window": int(self.settings.duplicate_window * 1e9),
                    "allow_direct": True,
                }
            )
            consumers = 0
        if consumers == 0:
            await self._create_keeper(stream)
            if any(name != KEEPER for name in await self.consumers(stream) or []):
                await self._drop_keeper(stream)  # a group joined meanwhile
        return stream

    async def _create_consumer(
        self, stream: str, name: str, config: dict[str, Any]
    ) -> dict[str, Any]:
        config = {
            "durable_name": name,
            "ack_policy": "explicit",
            "ack_wait": int(30 * 1e9),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "deliver_policy": "all",
            "replay_policy": "instant",
            **config,
        }
        answer: dict[str, Any] = await self.connection.api(
            f"CONSUMER.DURABLE.CREATE.{stream}.{name}",
            {"stream_name": stream, "config": config},
            what=f"creating consumer {name} of {stream}",
        )
        return answer

    async def _create_keeper(self, stream: str) -> None:
        await self._create_consumer(stream, KEEPER, {"description": "wirework keeper"})

    async def _drop_keeper(self, stream: str) -> None:
        with contextlib.suppress(JetStreamRefusedError):
            await self.connection.api(
                f"CONSUMER.DELETE.{stream}.{KEEPER}", None, what="dropping the keeper"
            )

    async def _consumer(self, stream: str, name: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self.connection.api(
                f"CONSUMER.INFO.{stream}.{name}", None, what=f"reading consumer {name}"
            )
        except JetStreamRefusedError as exc:
            if exc.err_code in (CONSUMER_NOT_FOUND, STREAM_NOT_FOUND):
                return None
            raise
        return info

    async def consumers(self, stream: str) -> list[str] | None:
        """Names of the stream's consumers; None if there is no such stream."""
        try:
            return [c["name"] for c in await self.connection.consumer_list(stream)]
        except JetStreamRefusedError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                return None
            raise

    async def join(self, subscription: Subscription) -> Group:
        """The subscription's group, created at its start position on first use.

        One lease per group (JetStream's AckWait): the subscription that joins
        last sets it, so mixing leases within one group is not supported.
        """
        try:
            return await self._join(subscription)
        except JetStreamRefusedError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
            self.forget(subscription.topic)  # deleted since we created it
            return await self._join(subscription)

    async def _join(self, subscription: Subscription) -> Group:
        topic, group = subscription.topic, subscription.group
        stream = await self.topic(topic)
        name = self.names.consumer(group)
        lease_ns = int(subscription.lease_timeout * 1e9)
        info = await self._consumer(stream, name)
        if info is None:
            config: dict[str, Any] = {"description": group, "ack_wait": lease_ns}
            if subscription.start == "latest":
                state = await self.connection.api(
                    f"STREAM.INFO.{stream}", None, what=f"reading topic {topic!r}"
                )
                config["deliver_policy"] = "by_start_sequence"
                config["opt_start_seq"] = int(state["state"]["last_seq"]) + 1
            try:
                info = await self._create_consumer(stream, name, config)
            except JetStreamRefusedError:
                info = await self._consumer(stream, name)  # created by someone else meanwhile
                if info is None:
                    raise
        elif int(info["config"]["ack_wait"]) != lease_ns:
            with contextlib.suppress(JetStreamRefusedError):
                info = await self._create_consumer(
                    stream, name, {**info["config"], "ack_wait": lease_ns}
                )
        await self._drop_keeper(stream)
        config = info["config"]
        return Group(
            topic=topic,
            name=group,
            stream=stream,
            consumer=name,
            lease=int(config["ack_wait"]) / 1e9,
            start=int(config.get("opt_start_seq") or 0),
        )

    async def delete_group(self, topic: str, group: str) -> None:
        """Delete a group's consumer (and what only it held) and its records.

        With its last group the topic goes too: a keeper takes over first, so a
        message published meanwhile is kept, and the stream is deleted only if
        it is empty then. A publish in the instant between that look and the
        deletion is lost (JetStream has no conditional delete).
        """
        stream = self.names.topic_stream(topic)
        consumer = self.names.consumer(group)
        consumers = await self.consumers(stream)
        if consumers is None or consumer not in consumers:
            return
        last = not (set(consumers) - {consumer, KEEPER})
        if last:
            await self._create_keeper(stream)
        with contextlib.suppress(JetStreamRefusedError):
            await self.connection.api(
                f"CONSUMER.DELETE.{stream}.{consumer}",
                None,
                what=f"deleting group {group!r} of {topic!r}",
            )
        await self.stores.purge(topic, group)
        if not last:
            return
        info = await self.connection.api(
            f"STREAM.INFO.{stream}", None, what=f"reading topic {topic!r}"
        )
        if int(info["state"]["messages"]) == 0:
            self.forget(topic)
            with contextlib.suppress(JetStreamRefusedError):
                await self.connection.api(
                    f"STREAM.DELETE.{stream}", None, what=f"deleting topic {topic!r}"
                )
