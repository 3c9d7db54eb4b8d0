"""FastStream doing publish -> consume -> ack on each server, set up as close to wirework as it can.

Each broker is built with FastStream 0.7's own API (read from its source):
``logger=None`` (its per-message log lines are off, as wirework writes none),
a typed handler ``async def handle(order: Order)`` (FastStream parses and
validates the body), and its default ack policy (ack once the handler returned):

* ``RedisBroker``: a stream subscriber with a consumer group
  (``StreamSub(group=..., consumer=..., max_records=PREFETCH)``, ``XREADGROUP``
  blocking 100 ms), ``max_workers=CONCURRENCY``; ``XACK`` per message;
  ``publish(stream=...)`` is one ``XADD``; ``max_connections=128``, since its
  pool raises when exhausted where wirework's and the raw side's queue at 64.
* ``RabbitBroker``: a durable direct ``RabbitExchange`` and a durable quorum
  ``RabbitQueue``; its channel has publisher confirms (FastStream's default)
  and ``prefetch_count=PREFETCH``; ``publish(persist=True, mandatory=True)``
  returns on the confirm. FastStream has no ``max_workers`` for RabbitMQ, so up
  to ``PREFETCH`` handlers run at once.
* ``NatsBroker``: a ``JStream`` (file storage, interest retention) and a
  durable pull subscriber (``PullSub(batch_size=PREFETCH)``,
  ``max_workers=CONCURRENCY``); ``publish(stream=..., timeout=5)`` returns on the
  PubAck (5 s as nats-py and wirework allow, not FastStream's 0.5 s default);
  ``msg.ack()`` per message.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from bench.flow import Counter
from bench.payload import CONCURRENCY, GROUP, PREFETCH, Order
from bench.servers import nats_stream, redis_key
from wirework.envelope import WireMessage

#: Seconds an idle pull waits on the server before FastStream asks again.
IDLE_FETCH = 0.1

#: Seconds a NATS publish may wait for its PubAck: FastStream's default is 0.5 s, where
#: nats-py's (the raw side) and wirework's are 5 s; with 100 publishes in flight on a busy
#: machine, 0.5 s ran out and ended the run.
NATS_PUBLISH_TIMEOUT = 5.0


class _Peer:
    """What the three FastStream sides share: a broker, one subscriber, stop on close."""

    broker: Any = None

    async def settled(self) -> None:
        return None  # FastStream acks as the handler returns; the count is taken inside it

    async def _stop(self) -> None:
        if self.broker is not None:
            await self.broker.stop()


class FastStreamRedis(_Peer):
    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.url = url
        self.stream = redis_key(namespace, f"fs.{name}")

    async def start(self, counter: Counter) -> None:
        from faststream.redis import RedisBroker, StreamSub

        # Its pool raises past max_connections instead of queueing: room for 100 in flight.
        # logger=None turns its logging off (RedisBrokerParams types it without the None).
        self.broker = RedisBroker(self.url, logger=None, max_connections=128)  # type: ignore[arg-type]
        subscriber = self.broker.subscriber(
            stream=StreamSub(self.stream, group=GROUP, consumer="bench-1", max_records=PREFETCH),
            max_workers=CONCURRENCY,
        )

        async def handle(order: Order) -> None:
            counter.add()

        subscriber(handle)
        await self.broker.start()

    async def send(self, message: WireMessage) -> None:
        await self.broker.publish(message.body, stream=self.stream, headers=dict(message.headers))

    async def aclose(self) -> None:
        import redis.asyncio

        try:
            await self._stop()
        finally:
            client: Any = redis.asyncio.Redis.from_url(self.url)
            try:
                await client.delete(self.stream)
            finally:
                await client.aclose()


class FastStreamRabbit(_Peer):
    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.url = url
        self.name = f"{namespace}.fs.{name}"

    async def start(self, counter: Counter) -> None:
        from faststream.rabbit import (
            Channel,
            ExchangeType,
            QueueType,
            RabbitBroker,
            RabbitExchange,
            RabbitQueue,
        )

        self.broker = RabbitBroker(self.url, logger=None)
        self.exchange = RabbitExchange(self.name, type=ExchangeType.DIRECT, durable=True)
        queue = RabbitQueue(self.name, queue_type=QueueType.QUORUM, durable=True, routing_key="any")
        subscriber = self.broker.subscriber(
            queue, self.exchange, channel=Channel(prefetch_count=PREFETCH)
        )

        async def handle(order: Order) -> None:
            counter.add()

        subscriber(handle)
        await self.broker.start()

    async def send(self, message: WireMessage) -> None:
        await self.broker.publish(
            message.body,
            exchange=self.exchange,
            routing_key="any",
            persist=True,
            mandatory=True,
            headers=dict(message.headers),
        )

    async def aclose(self) -> None:
        import aio_pika

        try:
            await self._stop()
        finally:
            connection = await aio_pika.connect(self.url)
            try:
                channel = await connection.channel()
                await channel.queue_delete(self.name)
                await channel.exchange_delete(self.name)
            finally:
                await connection.close()


class FastStreamNats(_Peer):
    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.url = url
        self.stream = nats_stream(namespace, f"fs_{name}")
        self.subject = f"{namespace}.fs.{name}"

    async def start(self, counter: Counter) -> None:
        from faststream.nats import JStream, NatsBroker, PullSub, RetentionPolicy, StorageType

        self.broker = NatsBroker(self.url, logger=None)
        stream = JStream(
            self.stream,
            subjects=[self.subject],
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
        subscriber = self.broker.subscriber(
            self.subject,
            stream=stream,
            durable=GROUP,
            pull_sub=PullSub(batch_size=PREFETCH, timeout=IDLE_FETCH),
            max_workers=CONCURRENCY,
        )

        async def handle(order: Order) -> None:
            counter.add()

        subscriber(handle)
        await self.broker.start()

    async def send(self, message: WireMessage) -> None:
        await self.broker.publish(
            message.body,
            self.subject,
            stream=self.stream,
            headers=dict(message.headers),
            timeout=NATS_PUBLISH_TIMEOUT,
        )

    async def aclose(self) -> None:
        import nats

        try:
            await self._stop()
        finally:
            client = await nats.connect(self.url)
            try:
                with contextlib.suppress(Exception):
                    await client.jetstream().delete_stream(self.stream)
            finally:
                await client.close()


def quiet() -> None:
    """FastStream's own loggers stay quiet even where ``logger=None`` does not reach."""
    logging.getLogger("faststream").setLevel(logging.WARNING)
