"""Request-reply over every backend, counted: each request ends by its deadline, nothing leaks.

These run on the conformance ``target`` fixture, so every backend that keeps
the broker contract also proves request-reply (issue 3's acceptance counts).
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import pytest
from pydantic import BaseModel

from wirework.brokers.base import Broker, DeadLetterReason, DeadLetterStore, Inspectable
from wirework.envelope import Envelope
from wirework.errors import RemoteError, RequestTimeoutError
from wirework.service import Context, Service
from wirework.testing.conformance import ConformanceTarget, wait_until

CONCURRENT = 5_000


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


async def test_thousands_of_concurrent_requests_each_get_their_own_reply(
    target: ConformanceTarget,
) -> None:
    """5,000 requests in flight on one instance: every one resolves to the reply for it."""
    broker = await target.open()
    caller = Service("caller", broker=broker)
    async with responder(broker), caller:
        replies = await asyncio.gather(
            *(
                caller.request("ask", Ask(n=n), returns=Answer, timeout=60)
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
        await caller.publish_envelope(caller._running_requester().reply_topic, copy)
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
