"""Request-reply written by hand with each server's client: the round trip wirework is held to.

Both ends parse what they receive into the same pydantic models as wirework's
handlers (``Ask``, ``Answer``) and check the answer is for the question.

* redis-py: the caller ``XADD``-s to a request stream (correlation id, its reply
  stream, body) and reads its own reply stream with a blocking ``XREAD``; the
  responder reads the request stream with a blocking ``XREAD`` and ``XADD``-s
  each answer to the named reply stream. No consumer group, no acks.
* aio-pika: the request is persistent and confirmed, into a durable quorum
  queue; the responder (``basic.qos`` 32, manual acks) answers through RabbitMQ's
  direct reply-to (``amq.rabbitmq.reply-to``, no queue, not persisted).
* nats-py: core NATS request-reply (``nc.request``, ``msg.respond``): no
  JetStream, nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from bench.flow import SUBJECT, Answer, Ask, Call
from bench.payload import PREFETCH
from bench.servers import redis_key

Answered = Callable[[], int]
"""How many requests a responder has answered so far."""

#: Seconds a raw caller waits for one answer before the run counts as broken.
TIMEOUT = 30.0


def check(answer: Answer, n: int) -> None:
    if answer.n != n:
        raise RuntimeError(f"request {n} got the answer for {answer.n}")


# -- Redis -------------------------------------------------------------------------------

#: Longest blocking XREAD: a reader looks at its stop flag this often.
BLOCK_MS = 200


async def _end(reader: asyncio.Task[None], stopping: asyncio.Event) -> None:
    """Stop a reader between two reads: redis-py can hang cancelling a blocked XREAD."""
    stopping.set()
    done, _ = await asyncio.wait({reader}, timeout=BLOCK_MS / 1000 + 5)
    if not done:
        reader.cancel()
    elif not reader.cancelled() and reader.exception() is not None:
        raise RuntimeError("the Redis reader failed") from reader.exception()


@contextlib.asynccontextmanager
async def redis_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import redis.asyncio

    client: Any = redis.asyncio.Redis.from_url(url)
    requests = redis_key(namespace, "raw.rr")
    answered = 0
    stopping = asyncio.Event()

    async def serve() -> None:
        nonlocal answered
        last = "0-0"
        while not stopping.is_set():
            reply = await client.xread({requests: last}, count=PREFETCH, block=BLOCK_MS)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    ask = Ask.model_validate_json(fields[b"b"])
                    body = Answer(n=ask.n).model_dump_json()
                    await client.xadd(fields[b"r"], {"c": fields[b"c"], "b": body})
                    answered += 1

    task = asyncio.create_task(serve())
    try:
        await client.ping()
        yield lambda: answered
    finally:
        await _end(task, stopping)
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_caller(url: str, namespace: str) -> AsyncIterator[Call]:
    import redis.asyncio

    client: Any = redis.asyncio.Redis.from_url(url)
    requests = redis_key(namespace, "raw.rr")
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
                    future = pending.pop(fields[b"c"], None)
                    if future is not None and not future.done():
                        future.set_result(fields[b"b"])

    async def call(n: int) -> None:
        correlation = str(next(numbers)).encode()
        future = pending[correlation] = asyncio.get_running_loop().create_future()
        body = Ask(n=n).model_dump_json()
        await client.xadd(requests, {"c": correlation, "r": replies, "b": body})
        async with asyncio.timeout(TIMEOUT):
            check(Answer.model_validate_json(await future), n)

    reader = asyncio.create_task(read())
    try:
        yield call
    finally:
        await _end(reader, stopping)
        with contextlib.suppress(Exception):
            await client.delete(requests, replies)
        await client.aclose()


# -- RabbitMQ ----------------------------------------------------------------------------


def rabbit_queue(namespace: str) -> str:
    return f"{namespace}.raw.rr"


async def _declare_requests(channel: Any, namespace: str) -> Any:
    return await channel.declare_queue(
        rabbit_queue(namespace), durable=True, arguments={"x-queue-type": "quorum"}
    )


@contextlib.asynccontextmanager
async def rabbit_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import aio_pika

    connection = await aio_pika.connect(url)
    answered = 0
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await _declare_requests(channel, namespace)

        async def respond(message: Any) -> None:
            nonlocal answered
            ask = Ask.model_validate_json(message.body)
            reply = aio_pika.Message(
                Answer(n=ask.n).model_dump_json().encode(), correlation_id=message.correlation_id
            )
            answered += 1
            await channel.default_exchange.publish(reply, routing_key=message.reply_to)
            await message.ack()

        tag = await queue.consume(respond)
        yield lambda: answered
        await queue.cancel(tag)
        await channel.queue_delete(queue.name)  # the caller is gone: nothing else uses it
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
        queue = await _declare_requests(channel, namespace)
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
            await channel.default_exchange.publish(request, routing_key=queue.name)
            async with asyncio.timeout(TIMEOUT):
                check(Answer.model_validate_json(await future), n)

        yield call
    finally:
        await connection.close()


# -- NATS --------------------------------------------------------------------------------


def nats_subject(namespace: str) -> str:
    return f"{namespace}.raw.{SUBJECT}"


@contextlib.asynccontextmanager
async def nats_responder(url: str, namespace: str) -> AsyncIterator[Answered]:
    import nats

    client = await nats.connect(url)
    answered = 0

    async def respond(message: Any) -> None:
        nonlocal answered
        ask = Ask.model_validate_json(message.data)
        await message.respond(Answer(n=ask.n).model_dump_json().encode())
        answered += 1

    try:
        await client.subscribe(nats_subject(namespace), cb=respond)
        await client.flush()
        yield lambda: answered
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def nats_caller(url: str, namespace: str) -> AsyncIterator[Call]:
    import nats

    client = await nats.connect(url)
    subject = nats_subject(namespace)

    async def call(n: int) -> None:
        reply = await client.request(subject, Ask(n=n).model_dump_json().encode(), timeout=TIMEOUT)
        check(Answer.model_validate_json(reply.data), n)

    try:
        yield call
    finally:
        await client.close()


RESPONDERS = {"redis": redis_responder, "rabbitmq": rabbit_responder, "nats": nats_responder}
CALLERS = {"redis": redis_caller, "rabbitmq": rabbit_caller, "nats": nats_caller}
