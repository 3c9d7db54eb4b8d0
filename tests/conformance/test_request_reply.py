"""Request-reply over every backend, counted: each request ends by its deadline, nothing leaks.

These run on the conformance ``target`` fixture, so every backend that keeps
the broker contract also proves request-reply (issue 3's acceptance counts).
On Redis, RabbitMQ and NATS replies come back through a direct inbox (issue 4),
so the same checks prove that path there, and the topic path on memory and
SQLite; the checks at the end prove what only the direct path has: the
inbox gone from the server after stop, a caller of the topic kind still
answered, and the behaviour when the inbox's connection is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from tests.conformance.conftest import BACKENDS, PurgingTarget, server_target_of
from tests.helpers.fault_proxy import FaultProxy
from wirework.brokers import connect
from wirework.brokers.base import (
    Broker,
    DeadLetterReason,
    DeadLetterStore,
    DirectReplies,
    Inspectable,
    ReplyInbox,
)
from wirework.envelope import Envelope
from wirework.errors import BrokerUnavailableError, RemoteError, ReplyLostError, RequestTimeoutError
from wirework.service import Context, Service
from wirework.service.requests import Requester
from wirework.testing.conformance import ConformanceTarget, wait_until

CONCURRENT = 5_000

#: Backends with a direct reply path, and the scheme of their inbox addresses.
DIRECT = {"redis": "redis-reply:", "rabbitmq": "amqp-reply:", "nats": "nats-reply:"}


class Ask(BaseModel):
    n: int
    delay: float = 0.0


class Answer(BaseModel):
    n: int
    by: str


class BadAsk(BaseModel):
    """Same wire type as Ask, wrong shape: the responder must dead-letter it."""

    __event_type__: ClassVar[str] = "Ask"
    wrong: str


def responder(broker: Broker, *, concurrency: int = 32) -> Service:
    svc = Service("answers", broker=broker)

    @svc.respond("ask", concurrency=concurrency, prefetch=max(64, concurrency))
    async def answer(ask: Ask, ctx: Context) -> Answer:
        if ask.n < 0:
            raise ValueError(f"cannot answer {ask.n}")
        if ask.delay:
            await asyncio.sleep(ask.delay)
        return Answer(n=ask.n, by=ctx.message_id)

    return svc


@pytest.mark.timeout(200)
async def test_thousands_of_concurrent_requests_each_get_their_own_reply(
    target: ConformanceTarget,
) -> None:
    """5,000 requests in flight on one instance: every one resolves to the reply for it.

    The deadline is generous on purpose: this checks that each request gets its own
    reply, not how fast (``bench`` measures that); a loaded 2-core machine moves
    only about 100 RabbitMQ request-replies a second with confirms.
    """
    broker = await target.open()
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        replies = await asyncio.gather(
            *(
                caller.request("ask", Ask(n=n), returns=Answer, timeout=150)
                for n in range(CONCURRENT)
            )
        )
        assert [reply.n for reply in replies] == list(range(CONCURRENT))
        assert len({reply.by for reply in replies}) == CONCURRENT
        stats = caller.request_stats
        assert (stats.sent, stats.replied, stats.timed_out) == (CONCURRENT, CONCURRENT, 0)
        assert stats.late_replies == stats.duplicate_replies == 0


async def test_timeouts_fire_on_time_and_leave_nothing_behind(target: ConformanceTarget) -> None:
    """With no responder, each request fails within [d, d + 10 % + 50 ms]; nothing stays pending,
    and stopping the caller removes its reply topic."""
    broker = await target.open()
    assert isinstance(broker, Inspectable)
    caller = Service("caller", broker=broker)
    deadline = 0.5
    async with caller:
        reply_topic = f"wirework.reply.caller.{caller.instance}"
        inbox = caller._running_requester()._inbox

        async def timed() -> float:
            started = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                await caller.request("nobody.listens", Ask(n=1), timeout=deadline)
            return time.monotonic() - started

        elapsed = await asyncio.gather(*(timed() for _ in range(200)))
        assert min(elapsed) >= deadline
        assert max(elapsed) <= deadline * 1.1 + 0.05, max(elapsed)
        assert caller.request_stats.timed_out == 200
        assert caller._running_requester().pending == 0

    async def reply_topic_gone() -> bool:
        return all(row.topic != reply_topic for row in await broker.stats())

    await wait_until(reply_topic_gone, what="the stopped caller's reply topic deleted")
    if inbox is not None:
        assert await inbox_gone_from_server(target, inbox)


async def test_a_cancelled_request_leaves_nothing_and_its_reply_counts_as_late(
    target: ConformanceTarget,
) -> None:
    """Cancelling the task that waits for a reply ends the request at once: nothing stays
    pending, and the reply that still comes is dropped as late, not handed to anyone."""
    broker = await target.open()
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        waiting = asyncio.create_task(
            caller.request("ask", Ask(n=1, delay=0.3), returns=Answer, timeout=10)
        )

        def request_sent() -> bool:
            return caller.request_stats.sent == 1

        await wait_until(request_sent, what="the request published")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert caller._running_requester().pending == 0

        def reply_dropped() -> bool:
            return caller.request_stats.late_replies == 1

        await wait_until(reply_dropped, what="the reply counted as late")
        assert caller.request_stats.replied == 0


async def test_responder_exception_arrives_as_remote_error(target: ConformanceTarget) -> None:
    """A handler exception comes back as RemoteError naming its type, not as a timeout."""
    broker = await target.open()
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await caller.request("ask", Ask(n=-5), returns=Answer, timeout=10)
        assert time.monotonic() - started < 5
        assert info.value.remote_type == "builtins.ValueError"
        assert "cannot answer -5" in info.value.remote_message
        assert info.value.reason == "handler_error"


async def test_dead_lettered_request_answers_with_an_error(target: ConformanceTarget) -> None:
    """A request that breaks the responder's schema is dead-lettered and answered, never silent."""
    broker = await target.open()
    assert isinstance(broker, DeadLetterStore)
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        with pytest.raises(RemoteError) as info:
            await caller.request("ask", BadAsk(wrong="shape"), returns=Answer, timeout=10)
        assert info.value.reason == DeadLetterReason.SCHEMA_VALIDATION.value
        dead = await broker.dead_letters(topic="ask")
        assert [letter.reason for letter in dead] == [DeadLetterReason.SCHEMA_VALIDATION]


async def test_late_and_duplicate_replies_are_dropped_and_counted(
    target: ConformanceTarget,
) -> None:
    """A reply after the deadline, and a second copy of a reply, reach nobody and are counted."""
    broker = await target.open()
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        with pytest.raises(RequestTimeoutError):
            await caller.request("ask", Ask(n=1, delay=0.6), returns=Answer, timeout=0.2)
        await wait_until(lambda: caller.request_stats.late_replies == 1, what="the late reply")
        answered = await caller.request("ask", Ask(n=2), timeout=10)
        copy = caller.envelope(Answer(n=2, by="again"))
        copy = copy.model_copy(update={"causationid": answered.causationid})
        await caller._send_reply(caller._running_requester().reply_address, copy)
        await wait_until(
            lambda: caller.request_stats.duplicate_replies == 1, what="the duplicate reply"
        )
        assert caller.request_stats.replied == 1


class Placed(BaseModel):
    order: int


class Reserved(BaseModel):
    order: int


class Shipped(BaseModel):
    order: int


async def test_causation_chain_is_complete_across_three_hops(target: ConformanceTarget) -> None:
    """publish -> handler publishes -> handler sends -> handler: each hop names its cause,
    and all share the first event's correlation."""
    broker = await target.open()
    seen: dict[str, Envelope] = {}
    svc = Service("chain", broker=broker)

    @svc.subscribe("chain.placed")
    async def placed(event: Placed, ctx: Context) -> None:
        seen["placed"] = ctx.envelope
        await ctx.publish("chain.reserved", Reserved(order=event.order))

    @svc.subscribe("chain.reserved")
    async def reserved(event: Reserved, ctx: Context) -> None:
        seen["reserved"] = ctx.envelope
        await svc.send("chain.ship", Shipped(order=event.order))  # the service, not ctx: same

    @svc.consume("chain.ship")
    async def ship(command: Shipped, ctx: Context) -> None:
        seen["shipped"] = ctx.envelope

    async with svc:
        first = await svc.publish("chain.placed", Placed(order=9))
        await wait_until(lambda: "shipped" in seen, what="the third hop")
    assert first.causationid is None
    assert seen["placed"].id == first.id
    assert seen["reserved"].causationid == first.id
    assert seen["shipped"].causationid == seen["reserved"].id
    correlations = {envelope.correlationid for envelope in seen.values()}
    assert correlations == {first.id}


# -- the direct reply path (Redis, RabbitMQ, NATS) --------------------------------------------


async def inbox_gone_from_server(target: ConformanceTarget, inbox: ReplyInbox) -> bool:
    """Ask the server itself (with its own client) whether a closed inbox left anything."""
    assert isinstance(target, PurgingTarget)
    if target.backend == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(target.url)
        try:
            keys = [
                key async for key in client.scan_iter(match="{" + target.namespace + "}:reply:*")
            ]
            return keys == []
        finally:
            await client.aclose()
    if target.backend == "nats":
        import nats
        import nats.errors

        peer = await nats.connect(target.url)
        try:
            await peer.request(inbox.address.split(":", 1)[1], b"", timeout=5)
        except nats.errors.NoRespondersError:
            return True  # the server knows no subscription on the inbox subject
        finally:
            await peer.close()
        return False
    # RabbitMQ: direct reply-to has no queue; the consumer lives and dies with its channel.
    channel = getattr(inbox, "channel", "missing")
    return channel is None


@pytest.fixture(params=[pytest.param(name, marks=BACKENDS[name].marks) for name in DIRECT])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[PurgingTarget]:
    """A server backend with a direct reply path, in a namespace purged afterwards."""
    async with server_target_of(request.param) as built:
        yield built


async def test_replies_come_back_through_a_direct_inbox_on_server_backends(
    target: ConformanceTarget,
) -> None:
    """Redis, RabbitMQ and NATS answer through the caller's inbox, create no reply topic, and
    leave nothing on the server after stop; memory and SQLite keep the reply topic (their
    reply path is already cheap)."""
    broker = await target.open()
    assert isinstance(broker, Inspectable)
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        requester = caller._running_requester()
        reply = await caller.request("ask", Ask(n=7), returns=Answer, timeout=10)
        assert reply.n == 7
        topics = {row.topic for row in await broker.stats()}
        inbox = requester._inbox
        if target.name in DIRECT:
            assert requester.direct
            assert isinstance(broker, DirectReplies)
            assert requester.reply_address.startswith(DIRECT[target.name])
            assert requester.reply_topic not in topics
        else:
            assert not requester.direct
            assert requester.reply_address == requester.reply_topic in topics
    if inbox is not None:
        assert await inbox_gone_from_server(target, inbox)


async def test_a_caller_with_a_reply_topic_is_still_answered_on_it(
    server: PurgingTarget,
) -> None:
    """A responder whose broker has a direct path answers a topic-kind ``replyto`` (an older
    caller, or one without the path) on that topic, errors included."""
    broker = await server.open()
    caller = Service("old-caller", broker=broker)
    requester = Requester(
        broker,
        reply_topic=f"wirework.reply.old-caller.{caller.instance}",
        clock=caller.clock,
        publish=lambda topic, envelope: caller.publish_envelope(topic, envelope),
        direct=False,
    )
    await requester.open()
    reading = asyncio.create_task(requester.run())
    try:
        async with responder(broker):
            assert requester.reply_address == requester.reply_topic

            async def ask(n: int) -> Envelope:
                request = caller.envelope(Ask(n=n), replyto=requester.reply_address)
                return await requester.request("ask", request, timeout=10)

            assert (await ask(3)).decode(Answer).n == 3
            with pytest.raises(RemoteError) as info:
                await ask(-3)
            assert info.value.remote_type == "builtins.ValueError"
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    assert requester.stats.replied == 2  # error replies included
    assert requester.stats.remote_errors == 1


def _through(proxy: FaultProxy, target: PurgingTarget) -> Broker:
    """A broker on ``target``'s server and namespace, reached through ``proxy``."""
    fast: dict[str, Any] = {"reconnect_initial_backoff": 0.05, "reconnect_max_backoff": 0.25}
    if target.backend == "redis":
        return connect(f"redis://127.0.0.1:{proxy.port}/0", namespace=target.namespace, **fast)
    if target.backend == "rabbitmq":
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        return connect(url, namespace=target.namespace, heartbeat=2, **fast)
    return connect(f"nats://127.0.0.1:{proxy.port}", namespace=target.namespace, **fast)


async def _ask_until_answered(caller: Service, n: int) -> Answer:
    """Ask until the request goes out and is answered (the connection may still be coming back)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await caller.request("ask", Ask(n=n), returns=Answer, timeout=5)
        except (BrokerUnavailableError, ReplyLostError, RequestTimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_cut_connection_keeps_the_inbox_or_fails_its_requests_at_once(
    server: PurgingTarget,
) -> None:
    """Every connection of the caller is cut while a request waits for a slow reply.

    Redis keeps the reply stream, so the waiting request still gets its reply; NATS
    subscribes again to the same subject, so later requests get theirs (a reply sent
    during the cut may be lost: that request times out); RabbitMQ's direct reply-to dies
    with its channel, so the waiting request fails at once with ReplyLostError, long
    before its deadline, and a new inbox answers later requests.
    """
    responding = await server.open()
    async with FaultProxy(*_upstream(server)) as proxy:
        caller_broker = _through(proxy, server)
        caller = Service("cut-caller", broker=caller_broker)
        try:
            async with responder(responding), caller:
                assert (await caller.request("ask", Ask(n=1), returns=Answer, timeout=10)).n == 1
                before = caller._running_requester().reply_address
                deadline = 20.0
                started = time.monotonic()
                slow = asyncio.create_task(
                    caller.request("ask", Ask(n=2, delay=1.5), returns=Answer, timeout=deadline)
                )
                await wait_until(lambda: caller.request_stats.sent == 2, what="the slow request")
                assert proxy.cut() > 0
                if server.backend == "rabbitmq":
                    with pytest.raises(ReplyLostError):
                        await slow
                    assert time.monotonic() - started < 5.0
                    assert caller.request_stats.lost == 1
                elif server.backend == "redis":
                    assert (await slow).n == 2
                else:
                    with contextlib.suppress(RequestTimeoutError):
                        assert (await slow).n == 2
                    assert time.monotonic() - started < deadline * 1.1 + 0.05
                assert (await _ask_until_answered(caller, 3)).n == 3
                after = caller._running_requester().reply_address
                assert (after != before) if server.backend == "rabbitmq" else (after == before)
                assert caller._running_requester().pending == 0
        finally:
            await caller_broker.aclose()


def _upstream(target: PurgingTarget) -> tuple[str, int]:
    service = BACKENDS[target.backend].service
    assert service is not None
    return service[1], service[2]
