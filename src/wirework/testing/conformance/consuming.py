"""Checks of the contract as a ``wirework.consumer.Consumer`` uses it (retries, poison).

These run the real consumer over the backend: they prove that the backend's
nack delays, attempt counts and dead letters are what the consumer needs for
RELIABILITY.md P5 (DEV-07 to DEV-12): handler errors retried with backoff up
to ``max_attempts``, and input that can never succeed dead-lettered after one
attempt with its reason, without stopping the loop.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from wirework.brokers.base import Broker, DeadLetter, DeadLetterReason, Subscription
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import Reject
from wirework.testing.conformance.support import (
    ITEM_TYPE,
    Item,
    dead_letter_store,
    dead_letters_of,
    item,
    wait_for_backlog,
    wait_until,
)
from wirework.testing.conformance.target import ConformanceTarget

#: First retry delay of the consumer checks (RELIABILITY.md uses 100 ms; half keeps them fast).
BASE_DELAY = 0.05

#: Lease of the consumer checks; no check waits for it, it only has to outlast a handler.
LEASE = 1.0

#: Extra seconds a retry may take beyond its backoff (the broker's wake-up and the loop's).
_RETRY_SLACK = 0.3

M = TypeVar("M", bound=BaseModel)

_POLICY = RetryPolicy(max_attempts=3, base_delay=BASE_DELAY, multiplier=2.0, jitter=0.2)


class StrictItem(BaseModel):
    """A body model that refuses unknown fields and versions (DEV-09)."""

    model_config = ConfigDict(extra="forbid")

    n: int
    schema_version: Literal[1] = 1


class TransientError(Exception):
    """What a handler raises for a failure that a retry may cure."""


class _Calls:
    """Handler invocations per event id, with their loop times, for backoff checks."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.succeeded: list[str] = []

    def record(self, envelope: Envelope) -> int:
        """Note one invocation; return which attempt of this event it is (1-based)."""
        self.times[envelope.id].append(asyncio.get_running_loop().time())
        return len(self.times[envelope.id])

    def gaps(self, event_id: str) -> list[float]:
        times = self.times[event_id]
        return [later - earlier for earlier, later in pairwise(times)]


@asynccontextmanager
async def _consuming(
    broker: Broker,
    topic: str,
    handler: Callable[[M, Envelope], Awaitable[None]],
    *,
    model: type[M],
    retry: RetryPolicy = _POLICY,
) -> AsyncIterator[Consumer]:
    """A consumer of group ``svc`` running while the block runs; it must not stop by itself."""
    consumer = Consumer(
        broker,
        Subscription(topic=topic, group="svc", lease_timeout=LEASE, prefetch=4),
        routes=[Route(ITEM_TYPE, model, handler)],
        retry=retry,
        concurrency=4,
    )
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(consumer.run())
        try:
            yield consumer
            assert not running.done(), "the consumer loop ended on its own"
        finally:
            await consumer.stop(grace=1.0)


def _with_body(event_id: str, body: bytes) -> WireMessage:
    """A binary-mode message whose ce-* headers are valid and whose body is ``body``."""
    headers = encode_binary(Envelope.new(ITEM_TYPE, source="wirework.conformance", id=event_id))
    return WireMessage(headers=dict(headers.headers), body=body)


def _check_one_attempt(records: list[DeadLetter], reason: DeadLetterReason) -> None:
    for record in records:
        assert (record.reason, record.attempts) == (reason, 1), record


async def check_handler_errors_retry_then_dead_letter(target: ConformanceTarget) -> None:
    """A handler that always fails is retried with growing backoff up to max_attempts and
    then dead-lettered (``max_deliveries``, with the error class), not holding back the rest."""
    broker = await target.open()
    topic = "conformance.poison"
    calls = _Calls()

    async def handler(body: Item, envelope: Envelope) -> None:
        calls.record(envelope)
        if body.n < 2:
            raise RuntimeError(f"poison {body.n}")
        calls.succeeded.append(envelope.id)

    for n in range(7):
        await broker.publish(topic, item(n))
    async with _consuming(broker, topic, handler, model=Item):
        records = await dead_letters_of(broker, topic, count=2)
        await wait_until(lambda: len(calls.succeeded) == 5, what="the 5 healthy messages")
    for record in records:
        assert (record.reason, record.attempts) == (DeadLetterReason.MAX_DELIVERIES, 3), record
        assert record.error is not None
        assert record.error.error_type == "builtins.RuntimeError", record.error
        assert record.first_failure_at <= record.last_failure_at
    for event_id in ("m0", "m1"):
        gaps = calls.gaps(event_id)
        assert len(gaps) == 2, f"{event_id} was attempted {len(gaps) + 1} times"
        for k, gap in enumerate(gaps):
            assert gap >= BASE_DELAY * 2**k * (1 - _POLICY.jitter) - 0.01, f"{event_id}: {gaps}"
    await wait_for_backlog(broker, topic, "svc", 0)


async def check_transient_failures_then_success(target: ConformanceTarget) -> None:
    """A handler failing twice then succeeding is effected once, dead-letters nothing, and
    its retries wait the backoff schedule (DEV-12)."""
    broker = await target.open()
    topic = "conformance.transient"
    calls = _Calls()
    policy = RetryPolicy(max_attempts=5, base_delay=BASE_DELAY, multiplier=2.0, jitter=0.2)

    async def handler(body: Item, envelope: Envelope) -> None:
        if calls.record(envelope) < 3:
            raise TransientError(f"try again later ({body.n})")
        calls.succeeded.append(envelope.id)

    for n in range(3):
        await broker.publish(topic, item(n))
    async with _consuming(broker, topic, handler, model=Item, retry=policy):
        await wait_until(lambda: len(calls.succeeded) == 3, what="3 messages effected")
    assert sorted(calls.succeeded) == ["m0", "m1", "m2"], "an effect happened twice"
    for event_id in calls.succeeded:
        for k, gap in enumerate(calls.gaps(event_id)):
            backoff = BASE_DELAY * 2**k
            low, high = backoff * (1 - policy.jitter), backoff * (1 + policy.jitter)
            assert low - 0.01 <= gap <= high + _RETRY_SLACK, f"retry {k + 1} after {gap:.3f}s"
    assert await dead_letter_store(broker).dead_letters(topic=topic) == []
    await wait_for_backlog(broker, topic, "svc", 0)


async def check_malformed_payloads_dead_letter_at_once(target: ConformanceTarget) -> None:
    """Undecodable messages go to the dead letters after one attempt as
    ``deserialization_error``, never reach the handler, and 100 valid ones after them
    are all handled (DEV-08)."""
    broker = await target.open()
    topic = "conformance.malformed"
    bad_bodies = [b'{"n": 1', b'{"n": "\xff"}', b"", b"null", b"[1, 2]", b"\x00"]
    handled: list[str] = []

    async def handler(body: Item, envelope: Envelope) -> None:
        handled.append(envelope.id)

    for index, body in enumerate(bad_bodies):
        await broker.publish(topic, _with_body(f"bad{index}", body))
    await broker.publish(topic, WireMessage(headers={}, body=b"\x00\x01 not a cloudevent"))
    for n in range(100):
        await broker.publish(topic, item(n))
    async with _consuming(broker, topic, handler, model=Item):
        reason = DeadLetterReason.DESERIALIZATION_ERROR
        records = await dead_letters_of(broker, topic, reason=reason, count=len(bad_bodies) + 1)
        await wait_until(lambda: len(handled) == 100, what="100 valid messages handled")
    _check_one_attempt(records, DeadLetterReason.DESERIALIZATION_ERROR)
    expected = {f"bad{index}" for index in range(len(bad_bodies))} | {None}
    assert {record.message_id for record in records} == expected
    assert sorted(handled) == sorted(f"m{n}" for n in range(100)), "a bad message was handled"
    await wait_for_backlog(broker, topic, "svc", 0)


async def check_schema_violations_dead_letter_with_field(target: ConformanceTarget) -> None:
    """JSON that breaks the body's schema goes to the dead letters after one attempt as
    ``schema_validation`` with a pointer to the field, never reaching the handler (DEV-09)."""
    broker = await target.open()
    topic = "conformance.schema"
    bodies = [b"{}", b'{"n": "x"}', b'{"n": 1, "bogus": true}', b'{"n": 1, "schema_version": 2}']
    handled: list[str] = []

    async def handler(body: StrictItem, envelope: Envelope) -> None:
        handled.append(envelope.id)

    for index, body in enumerate(bodies):
        await broker.publish(topic, _with_body(f"bad{index}", body))
    await broker.publish(topic, _with_body("good", b'{"n": 5, "schema_version": 1}'))
    async with _consuming(broker, topic, handler, model=StrictItem):
        records = await dead_letters_of(broker, topic, count=len(bodies))
        await wait_until(lambda: handled == ["good"], what="the valid message handled")
    _check_one_attempt(records, DeadLetterReason.SCHEMA_VALIDATION)
    for record in records:
        assert record.error is not None
        assert (record.error.field or "").startswith("/"), f"no field pointer: {record.error}"
    await wait_for_backlog(broker, topic, "svc", 0)


async def check_unknown_type_dead_letters(target: ConformanceTarget) -> None:
    """An event type no route handles goes to the dead letters after one attempt as
    ``unknown_message_type``, and the queue drains to zero (DEV-10)."""
    broker = await target.open()
    topic = "conformance.unknown"
    handled: list[str] = []

    async def handler(body: Item, envelope: Envelope) -> None:
        handled.append(envelope.id)

    for n in range(3):
        await broker.publish(topic, item(n, event_type="wirework.conformance.mystery"))
    await broker.publish(topic, item(3))
    async with _consuming(broker, topic, handler, model=Item):
        reason = DeadLetterReason.UNKNOWN_MESSAGE_TYPE
        records = await dead_letters_of(broker, topic, reason=reason, count=3)
        await wait_until(lambda: handled == ["m3"], what="the known type handled")
    _check_one_attempt(records, DeadLetterReason.UNKNOWN_MESSAGE_TYPE)
    await wait_for_backlog(broker, topic, "svc", 0)


async def check_reject_dead_letters_at_once(target: ConformanceTarget) -> None:
    """A handler raising Reject sends its message to the dead letters as ``rejected`` after
    that one attempt."""
    broker = await target.open()
    topic = "conformance.reject"
    calls = _Calls()

    async def handler(body: Item, envelope: Envelope) -> None:
        calls.record(envelope)
        raise Reject(f"order {body.n} is not for us")

    await broker.publish(topic, item(1))
    async with _consuming(broker, topic, handler, model=Item):
        [record] = await dead_letters_of(broker, topic, count=1)
    assert (record.reason, record.attempts) == (DeadLetterReason.REJECTED, 1)
    assert record.error is not None
    assert record.error.error_type == "wirework.errors.Reject"
    assert len(calls.times["m1"]) == 1


async def check_oversized_delivery_dead_letters(target: ConformanceTarget) -> None:
    """A message over the consuming side's limit (accepted by a more lenient publisher) goes
    to the dead letters as ``too_large`` without reaching the handler (DEV-11 B)."""
    limit = 1024
    publisher = await target.open()
    topic = "conformance.toolarge"
    big = _with_body("big", b'{"n": 1, "padding": "' + b"x" * (4 * limit) + b'"}')
    await publisher.publish(topic, big)
    if target.shared_between_instances:
        consuming_broker = await target.open(max_message_bytes=limit)
    else:
        # One in-process instance: lowering its limit after the publish stands in for a
        # message that reached the broker past a client with a larger limit.
        consuming_broker = publisher
        consuming_broker.max_message_bytes = limit
    handled: list[str] = []

    async def handler(body: Item, envelope: Envelope) -> None:
        handled.append(envelope.id)

    await consuming_broker.publish(topic, item(2))
    async with _consuming(consuming_broker, topic, handler, model=Item):
        [record] = await dead_letters_of(consuming_broker, topic, count=1)
        await wait_until(lambda: handled == ["m2"], what="the small message handled")
    assert (record.reason, record.attempts, record.message_id) == (
        DeadLetterReason.TOO_LARGE,
        1,
        "big",
    )
