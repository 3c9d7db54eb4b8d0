"""The raw clients doing publish -> consume -> ack by hand: the reference for each server backend.

Each side keeps the shape of wirework's ``Consumer`` (``CONCURRENCY`` handlers,
at most ``PREFETCH`` messages held), parses every body into the same pydantic
model, and counts a message once its ack returned. What each one does per
message, with the durability settings wirework uses by default:

* redis-py: ``XADD`` (fields ``h`` headers JSON, ``b`` body); ``XREADGROUP``
  with a consumer group, up to the free prefetch per read (blocking up to
  ``IDLE_FETCH``); ``XACK``.
* aio-pika: a durable direct exchange bound to a durable quorum queue;
  persistent messages published with ``mandatory`` and publisher confirms;
  a consumer with ``basic.qos`` prefetch and manual ``basic.ack``.
* nats-py: a file-stored stream with interest retention; ``js.publish``
  awaiting the PubAck; a durable pull consumer with explicit acks,
  ``fetch(batch=<free prefetch>, timeout=IDLE_FETCH)`` (nats-py waits until
  the batch is full or the timeout is up); ``msg.ack()``, which the server
  does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import orjson

from bench.flow import Counter
from bench.payload import CONCURRENCY, GROUP, PREFETCH, Order
from bench.servers import nats_stream, redis_key
from wirework.envelope import WireMessage

T = TypeVar("T")

#: Seconds one idle fetch waits on the server before asking again.
IDLE_FETCH = 0.1


class Pump(Generic[T]):
    """``CONCURRENCY`` workers handling what a reader fetched, holding at most ``PREFETCH``.

    Pull-based clients give ``fetch(room)``; push-based ones (RabbitMQ, whose
    ``basic.qos`` bounds what it holds) call ``offer`` from their callback.
    """

    def __init__(
        self,
        counter: Counter,
        handle: Callable[[T], Awaitable[None]],
        fetch: Callable[[int], Awaitable[list[T]]] | None = None,
    ) -> None:
        self.counter = counter
        self._handle = handle
        self._fetch = fetch
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._held = 0
        self._room = asyncio.Event()
        self._stopping = False
        self._reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._fetch is not None:
            self._reader = asyncio.create_task(self._read(self._fetch))
            self.counter.watch(self._reader)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(CONCURRENCY)]
        for task in self._tasks:
            self.counter.watch(task)

    def offer(self, item: T) -> None:
        self._queue.put_nowait(item)

    async def _read(self, fetch: Callable[[int], Awaitable[list[T]]]) -> None:
        while not self._stopping:
            free = PREFETCH - self._held
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            fetched = await fetch(free)
            self._held += len(fetched)
            for item in fetched:
                self._queue.put_nowait(item)

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            await self._handle(item)
            self._held -= 1
            self._room.set()
            self.counter.add()

    async def stop(self) -> None:
        """Workers are cancelled; the reader ends between two fetches (redis-py can hang
        cancelling a blocked read), or is cancelled if it does not."""
        self._stopping = True
        self._room.set()
        tasks = list(self._tasks)
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=IDLE_FETCH + 5)
            tasks.append(self._reader)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def parse(body: bytes) -> Order:
    """What every raw handler does with a message: parse its body into the model."""
    return Order.model_validate_json(body)


class RawRedis:
    """redis-py (hiredis parser): XADD, XREADGROUP with a group, XACK."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        import redis.asyncio

        # Calls queue for a connection past 64, as wirework's do (its max_connections).
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=64)
        self.client: Any = redis.asyncio.Redis(connection_pool=pool)
        self.stream = redis_key(namespace, f"raw.{name}")
        self.pump: Pump[tuple[bytes, dict[bytes, bytes]]] | None = None

    async def start(self, counter: Counter) -> None:
        await self.client.xgroup_create(self.stream, GROUP, id="$", mkstream=True)
        self.pump = Pump(counter, self._handle, self._fetch)
        self.pump.start()

    async def _fetch(self, room: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = await self.client.xreadgroup(
            GROUP, "bench-1", {self.stream: ">"}, count=room, block=int(IDLE_FETCH * 1000)
        )
        return [entry for _, entries in reply or () for entry in entries]

    async def _handle(self, entry: tuple[bytes, dict[bytes, bytes]]) -> None:
        entry_id, fields = entry
        orjson.loads(fields[b"h"])
        parse(fields[b"b"])
        await self.client.xack(self.stream, GROUP, entry_id)

    async def send(self, message: WireMessage) -> None:
        await self.client.xadd(
            self.stream, {"h": orjson.dumps(dict(message.headers)), "b": message.body}
        )

    async def settled(self) -> None:
        return None  # counted after XACK returned

    async def aclose(self) -> None:
        try:
            if self.pump is not None:
                await self.pump.stop()
            await self.client.delete(self.stream)
        finally:
            await self.client.aclose()


class RawRabbit:
    """aio-pika: persistent, confirmed publishes to a durable quorum queue; manual acks."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.url = url
        self.name = f"{namespace}.raw.{name}"
        self.connection: Any = None
        self.exchange: Any = None
        self.consuming: Any = None
        self.tag: str | None = None
        self.pump: Pump[Any] | None = None

    async def start(self, counter: Counter) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        publishing = await self.connection.channel(publisher_confirms=True)
        self.exchange = await publishing.declare_exchange(
            self.name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await publishing.declare_queue(
            self.name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(self.exchange, routing_key="any")
        consuming = await self.connection.channel()
        await consuming.set_qos(prefetch_count=PREFETCH)
        pump: Pump[Any] = Pump(counter, self._handle)
        self.pump = pump
        pump.start()

        async def deliver(message: Any) -> None:
            pump.offer(message)

        self.consuming = await consuming.get_queue(self.name)
        self.tag = await self.consuming.consume(deliver)

    async def _handle(self, message: Any) -> None:
        parse(message.body)
        await message.ack()

    async def send(self, message: WireMessage) -> None:
        import aio_pika

        await self.exchange.publish(
            aio_pika.Message(
                message.body,
                headers=dict(message.headers),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="any",
            mandatory=True,
        )

    async def settled(self) -> None:
        return None  # basic.ack is sent without an answer: as soon as it is written

    async def aclose(self) -> None:
        if self.connection is None:
            return
        try:
            if self.tag is not None:
                await self.consuming.cancel(self.tag)
            if self.pump is not None:
                await self.pump.stop()
            channel = await self.connection.channel()
            await channel.queue_delete(self.name)
            await channel.exchange_delete(self.name)
        finally:
            await self.connection.close()


async def declare_js_group(js: Any, stream: str, subject: str, group: str = GROUP) -> None:
    """What wirework declares for a topic and its group, by hand: a file stream with
    interest retention and a 120 s duplicate window, and a durable pull consumer with
    explicit acks (shared by the throughput and the request-reply baselines)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType

    await js.add_stream(
        name=stream,
        subjects=[subject],
        retention=RetentionPolicy.INTEREST,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    )
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=group,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=-1,
        ),
    )


class RawNats:
    """nats-py JetStream: PubAck-awaited publishes, a durable pull consumer, msg.ack()."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.url = url
        self.stream = nats_stream(namespace, f"raw_{name}")
        self.subject = f"{namespace}.raw.{name}"
        self.client: Any = None
        self.js: Any = None
        self.pump: Pump[Any] | None = None

    async def start(self, counter: Counter) -> None:
        import nats

        self.client = await nats.connect(self.url)
        self.js = self.client.jetstream()
        await declare_js_group(self.js, self.stream, self.subject)
        subscription = await self.js.pull_subscribe_bind(durable=GROUP, stream=self.stream)

        async def fetch(room: int) -> list[Any]:
            try:
                messages: list[Any] = await subscription.fetch(batch=room, timeout=IDLE_FETCH)
            except TimeoutError:  # nats.errors.TimeoutError is one
                return []
            return messages

        self.pump = Pump(counter, self._handle, fetch)
        self.pump.start()

    async def _handle(self, message: Any) -> None:
        parse(message.data)
        await message.ack()

    async def send(self, message: WireMessage) -> None:
        await self.js.publish(self.subject, message.body, headers=dict(message.headers))

    async def settled(self) -> None:
        await self.client.flush()  # the acks are written and the server has read them

    async def aclose(self) -> None:
        if self.client is None:
            return
        try:
            if self.pump is not None:
                await self.pump.stop()
            with contextlib.suppress(Exception):
                await self.js.delete_stream(self.stream)
        finally:
            await self.client.close()
