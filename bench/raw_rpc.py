"""Request-reply written by hand with each server's client: the round trip wirework is held to.

Both ends parse what they receive into the same pydantic models as wirework's
handlers (``Ask``, ``Answer``) and check the answer is for the question. The
responder handles up to ``CONCURRENCY`` requests at once and holds at most
``PREFETCH``, as wirework's ``@svc.respond`` does.

The *same-work* baselines (``CALLERS``, ``RESPONDERS``) store, consume and ack
each request as wirework does, with the same durability settings (issue 4:
"the raw client doing the same work ... with the same durability settings"),
and send the reply the way wirework's direct inbox does:

* redis-py: the caller ``XADD``-s to the request stream (correlation id, its
  reply stream, body); the responder reads it in a consumer group
  (``XREADGROUP``, blocking), ``XADD``-s the answer to the caller's reply
  stream (``NOMKSTREAM``, capped) and then ``XACK``-s the request; the caller
  reads its own reply stream with a blocking ``XREAD``.
* aio-pika: the request is persistent, ``mandatory`` and confirmed, through a
  durable direct exchange into a durable quorum queue; the responder
  (``basic.qos`` 32, manual acks) answers through RabbitMQ's direct reply-to
  (``amq.rabbitmq.reply-to``, no queue, not persisted), then acks.
* nats-py: the request is a JetStream publish (``Nats-Msg-Id``, awaited PubAck)
  into a file-stored stream with interest retention; the responder pulls from a
  durable consumer with explicit acks (long-poll pull requests, batch = free
  prefetch, as ``fetch`` sends them, without its wait for a full batch),
  publishes the answer over core NATS to the caller's inbox subject, then acks.

The *lighter* references (``LIGHT_CALLERS``, ``LIGHT_RESPONDERS``) are what this
module measured before: cheaper than what wirework promises, kept as extra rows
so nobody takes them for the target.

* Redis, "XREAD, no group": the responder reads the request stream with a plain
  blocking ``XREAD``: no consumer group, no ack, no competing responders.
* NATS, "core NATS, nothing stored": ``nc.request`` / ``msg.respond``, no
  JetStream: a request sent while no responder listens is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.flow import SUBJECT, Answer, Ask, Call
from bench.payload import CONCURRENCY, PREFETCH
from bench.raw_clients import declare_js_group
from bench.servers import nats_stream, redis_key

Answered = Callable[[], int]
"""How many requests a responder has answered so far."""

#: Seconds a raw caller waits for one answer before the run counts as broken.
TIMEOUT = 30.0

#: The responders' consumer group (Redis, NATS).
GROUP = "responders"


def check(answer: Answer, n: int) -> None:
    if answer.n != n:
        raise RuntimeError(f"request {n} got the answer for {answer.n}")


class Handlers:
    """Handles at most ``CONCURRENCY`` requests at once; knows how many it holds."""

    def __init__(self) -> None:
        self.held = 0
        self.answered = 0
        self.failed: BaseException | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def room(self) -> int:
        return PREFETCH - self.held

    def start(self, handle: Awaitable[None], done: Callable[[], None] | None = None) -> None:
        self.held += 1

        async def run() -> None:
            try:
                async with self._slots:
                    await handle
                self.answered += 1
            except Exception as exc:  # counted; the parent sees answered fall short
                self.failed = exc
            finally:
                self.held -= 1
                if done is not None:
                    done()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=TIMEOUT)


# -- Redis -------------------------------------------------------------------------------

#: Longest blocking read: a reader looks at its stop flag this often.
BLOCK_MS = 200

#: Entries a reply stream keeps at most (approximately), as wirework's reply XADD caps it.
MAX_UNREAD = 10_000


async def _end(reader: asyncio.Task[None], stopping: asyncio.Event) -> None:
    """Stop a reader between two reads: redis-py can hang cancelling a blocked XREAD."""
    stopping.set()
    done, _ = await asyncio.wait({reader}, timeout=BLOCK_MS / 1000 + 5)
    if not done:
        reader.cancel()
    elif not reader.cancelled() and reader.exception() is not None:
        raise RuntimeError("the Redis reader failed") from reader.exception()


def _redis_requests(namespace: str, light: bool) -> str:
    return redis_key(namespace, "raw.rr.light" if light else "raw.rr")


@contextlib.asynccontextmanager
async def _redis_responder(url: str, namespace: str, *, light: bool) -> AsyncIterator[Answered]:
    import redis.asyncio
    import redis.exceptions

    client: Any = redis.asyncio.Redis.from_url(url)
    requests = _redis_requests(namespace, light)
    handlers = Handlers()
    stopping = asyncio.Event()
    room = asyncio.Event()
    consumer = uuid.uuid4().hex

    async def answer(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        ask = Ask.model_validate_json(fields[b"b"])
        body = Answer(n=ask.n).model_dump_json()
        reply = {"c": fields[b"c"], "b": body}
        if light:
            await client.xadd(fields[b"r"], reply)
            return
        await client.xadd(fields[b"r"], reply, maxlen=MAX_UNREAD, approximate=True, nomkstream=True)
        await client.xack(requests, GROUP, entry_id)

    async def serve() -> None:
        last = "0-0"
        while not stopping.is_set():
            if handlers.room <= 0:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BLOCK_MS / 1000):
                        await room.wait()
                continue
            if light:
                reply = await client.xread({requests: last}, count=handlers.room, block=BLOCK_MS)
            else:
                reply = await client.xreadgroup(
                    GROUP, consumer, {requests: ">"}, count=handlers.room, block=BLOCK_MS
                )
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    handlers.start(answer(entry_id, fields), room.set)

    if not light:
        with contextlib.suppress(redis.exceptions.ResponseError):  # BUSYGROUP: it exists
            await client.xgroup_create(requests, GROUP, id="0", mkstream=True)
    task = asyncio.create_task(serve())
    try:
        await client.ping()
        yield lambda: handlers.answered
    finally:
        await _end(task, stopping)
        await handlers.drain()
        with contextlib.suppress(Exception):
            await client.delete(requests)
        await client.aclose()


@contextlib.asynccontextmanager
async def _redis_caller(url: str, namespace: str, *, light: bool) -> AsyncIterator[Call]:
    import redis.asyncio

    client: Any = redis.asyncio.Redis.from_url(url)
    requests = _redis_requests(namespace, light)
    replies = redis_key(namespace, f"raw.rr.reply.{uuid.uuid4().hex[:8]}")
    pending: dict[bytes, asyncio.Future[bytes]] = {}
    numbers = itertools.count()
    stopping = asyncio.Event()

    async def read() -> None:
        last = "0-0"
        while not stopping.is_set():
            reply = await client.xread({replies: last}, count=PREFETCH, block=BLOCK_MS)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    future = pending.pop(fields.get(b"c", b""), None)
                    if future is not None and not future.done():
                        future.set_result(fields[b"b"])

    async def call(n: int) -> None:
        correlation = str(next(numbers)).encode()
        future = pending[correlation] = asyncio.get_running_loop().create_future()
        body = Ask(n=n).model_dump_json()
        await client.xadd(requests, {"c": correlation, "r": replies, "b": body})
        async with asyncio.timeout(TIMEOUT):
            check(Answer.model_validate_json(await future), n)

    # The reply stream exists before the first request: a reply never creates it.
    await client.xadd(replies, {"o": b""}, maxlen=0)
    reader = asyncio.create_task(read())
    try:
        yield call
    finally:
        await _end(reader, stopping)
        with contextlib.suppress(Exception):
            await client.delete(replies)  # the request stream is the responder's to delete
        await client.aclose()


def redis_responder(url: str, namespace: str) -> contextlib.AbstractAsyncContextManager[Answered]:
    return _redis_responder(url, namespace, light=False)


def redis_caller(url: str, namespace: str) -> contextlib.AbstractAsyncContextManager[Call]:
    return _redis_caller(url, namespace, light=False)


def redis_light_responder(
    url: str, namespace: str
) -> contextlib.AbstractAsyncContextManager[Answered]:
    return _redis_responder(url, namespace, light=True)


def redis_light_caller(url: str, namespace: str) -> contextlib.AbstractAsyncContextManager[Call]:
    return _redis_caller(url, namespace, light=True)


# -- RabbitMQ ----------------------------------------------------------------------------


def rabbit_queue(namespace: str) -> str:
    """The request queue, and the exchange that routes to it (one name, as the raw sides')."""
    return f"{namespace}.raw.rr"


async def _declare_requests(channel: Any, namespace: str) -> tuple[Any, Any]:
    import aio_pika

    name = rabbit_queue(namespace)
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, routing_key=SUBJECT)
    return exchange, queue


@contextlib.asynccontextmanager
async def rabbit_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import aio_pika

    connection = await aio_pika.connect(url)
    handlers = Handlers()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        _, queue = await _declare_requests(channel, namespace)

        async def answer(message: Any) -> None:
            ask = Ask.model_validate_json(message.body)
            reply = aio_pika.Message(
                Answer(n=ask.n).model_dump_json().encode(), correlation_id=message.correlation_id
            )
            await channel.default_exchange.publish(reply, routing_key=message.reply_to)
            await message.ack()

        async def respond(message: Any) -> None:
            handlers.start(answer(message))

        tag = await queue.consume(respond)
        yield lambda: handlers.answered
        await queue.cancel(tag)
        await handlers.drain()
        # The caller is gone: nothing else uses them.
        await channel.queue_delete(queue.name)
        await channel.exchange_delete(queue.name)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def rabbit_caller(url: str, namespace: str) -> AsyncIterator[Call]:
    import aio_pika

    connection = await aio_pika.connect(url)
    pending: dict[str, asyncio.Future[bytes]] = {}
    numbers = itertools.count()
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange, _ = await _declare_requests(channel, namespace)
        direct = aio_pika.Queue(
            channel,
            "amq.rabbitmq.reply-to",
            durable=False,
            exclusive=False,
            auto_delete=False,
            arguments=None,
        )

        async def replied(message: Any) -> None:
            future = pending.pop(message.correlation_id, None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await direct.consume(replied, no_ack=True)

        async def call(n: int) -> None:
            correlation = str(next(numbers))
            future = pending[correlation] = asyncio.get_running_loop().create_future()
            request = aio_pika.Message(
                Ask(n=n).model_dump_json().encode(),
                correlation_id=correlation,
                reply_to="amq.rabbitmq.reply-to",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(request, routing_key=SUBJECT, mandatory=True)
            async with asyncio.timeout(TIMEOUT):
                check(Answer.model_validate_json(await future), n)

        yield call
    finally:
        await connection.close()


# -- NATS --------------------------------------------------------------------------------

#: Seconds a pull request stays open on the server, filling as requests arrive.
PULL_EXPIRES = 5.0


def nats_subject(namespace: str, *, light: bool = False) -> str:
    return f"{namespace}.raw{'light' if light else ''}.{SUBJECT}"


def _nats_names(namespace: str) -> tuple[str, str]:
    """The same-work side's stream and subject."""
    return nats_stream(namespace, "raw_rr"), nats_subject(namespace)


class _Puller:
    """One long-poll pull request open at a time on a durable consumer, for as many
    messages as there is room for; a new one as soon as the last is used up or ends."""

    def __init__(self, client: Any, stream: str, handlers: Handlers) -> None:
        self.client = client
        self.handlers = handlers
        self.inbox: str = client.new_inbox()
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{GROUP}"
        self.outstanding = 0
        self.closed = False
        self.handle: Callable[[Any], Awaitable[None]] | None = None
        self._pulls: set[asyncio.Task[None]] = set()

    async def pull(self) -> None:
        if self.closed or self.outstanding > 0 or self.handlers.room <= 0:
            return
        batch = self.handlers.room
        self.outstanding = batch
        request = {"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}
        await self.client.publish(self.next_subject, json.dumps(request).encode(), self.inbox)

    def _handled(self) -> None:
        if not self.closed and self.outstanding == 0:
            task = asyncio.create_task(self.pull())
            self._pulls.add(task)
            task.add_done_callback(self._pulls.discard)

    async def received(self, msg: Any) -> None:
        if msg.headers and "Status" in msg.headers:  # 408 expired, 409 ...: this pull ended
            self.outstanding = 0
            await self.pull()
            return
        self.outstanding -= 1
        assert self.handle is not None
        self.handlers.start(self.handle(msg), self._handled)
        if self.outstanding == 0:
            await self.pull()


@contextlib.asynccontextmanager
async def nats_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import nats

    client = await nats.connect(url)
    js = client.jetstream()
    stream, subject = _nats_names(namespace)
    handlers = Handlers()
    try:
        await declare_js_group(js, stream, subject, GROUP)
        puller = _Puller(client, stream, handlers)

        async def answer(msg: Any) -> None:
            ask = Ask.model_validate_json(msg.data)
            headers = msg.headers
            await client.publish(
                headers["r"],
                Answer(n=ask.n).model_dump_json().encode(),
                headers={"c": headers["c"]},
            )
            await msg.ack()

        puller.handle = answer
        subscription = await client.subscribe(puller.inbox, cb=puller.received)
        await puller.pull()
        await client.flush()
        yield lambda: handlers.answered
        puller.closed = True
        await handlers.drain()
        await client.flush()
        await subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def nats_caller(url: str, namespace: str) -> AsyncIterator[Call]:
    import nats

    client = await nats.connect(url)
    js = client.jetstream()
    _, subject = _nats_names(namespace)
    inbox = client.new_inbox()
    pending: dict[str, asyncio.Future[bytes]] = {}
    numbers = itertools.count()

    async def replied(msg: Any) -> None:
        future = pending.pop((msg.headers or {}).get("c", ""), None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def call(n: int) -> None:
        correlation = str(next(numbers))
        future = pending[correlation] = asyncio.get_running_loop().create_future()
        headers = {"Nats-Msg-Id": uuid.uuid4().hex, "c": correlation, "r": inbox}
        await js.publish(subject, Ask(n=n).model_dump_json().encode(), headers=headers)
        async with asyncio.timeout(TIMEOUT):
            check(Answer.model_validate_json(await future), n)

    try:
        await client.subscribe(inbox, cb=replied)
        await client.flush()
        yield call
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def nats_light_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import nats

    client = await nats.connect(url)
    handlers = Handlers()

    async def answer(message: Any) -> None:
        ask = Ask.model_validate_json(message.data)
        await message.respond(Answer(n=ask.n).model_dump_json().encode())

    async def respond(message: Any) -> None:
        handlers.start(answer(message))

    try:
        await client.subscribe(nats_subject(namespace, light=True), cb=respond)
        await client.flush()
        yield lambda: handlers.answered
        await handlers.drain()
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def nats_light_caller(url: str, namespace: str) -> AsyncIterator[Call]:
    import nats

    client = await nats.connect(url)
    subject = nats_subject(namespace, light=True)

    async def call(n: int) -> None:
        reply = await client.request(subject, Ask(n=n).model_dump_json().encode(), timeout=TIMEOUT)
        check(Answer.model_validate_json(reply.data), n)

    try:
        yield call
    finally:
        await client.close()


Responder = Callable[[str, str], contextlib.AbstractAsyncContextManager[Answered]]
Caller = Callable[[str, str], contextlib.AbstractAsyncContextManager[Call]]

RESPONDERS: dict[str, Responder] = {
    "redis": redis_responder,
    "rabbitmq": rabbit_responder,
    "nats": nats_responder,
}
CALLERS: dict[str, Caller] = {"redis": redis_caller, "rabbitmq": rabbit_caller, "nats": nats_caller}
LIGHT_RESPONDERS: dict[str, Responder] = {
    "redis": redis_light_responder,
    "nats": nats_light_responder,
}
LIGHT_CALLERS: dict[str, Caller] = {"redis": redis_light_caller, "nats": nats_light_caller}
