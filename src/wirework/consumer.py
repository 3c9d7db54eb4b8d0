"""Run one consumer of a group: decode, route, handle, then ack, retry or dead-letter.

This is where the broker contract becomes safe to use: a handler exception
means a retry after an exponential, jittered backoff, up to ``max_attempts``,
and then the dead letters; a message that can never succeed (undecodable,
schema-breaking, unknown type, too large) goes to the dead letters after one
attempt, so poison never burns retries and never stops the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from wirework.brokers.base import Broker, DeadLetterReason, Delivery, Failure, Subscription
from wirework.clock import SYSTEM_CLOCK, Clock, wait_first
from wirework.envelope import Envelope, decode_wire
from wirework.errors import (
    BrokerError,
    ConfigurationError,
    DecodeError,
    Reject,
    Retry,
    SchemaValidationError,
    UnknownMessageTypeError,
)
from wirework.faults import ARMED as FAULTS_ARMED
from wirework.faults import fault_point

log = logging.getLogger("wirework.consumer")

_RESUBSCRIBE_FIRST = 0.05
_RESUBSCRIBE_MAX = 5.0

M = TypeVar("M", bound=BaseModel)

Handler = Callable[[M, Envelope], Awaitable[None]]


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter, bounded by ``max_attempts`` deliveries in all.

    The delay after the k-th failed attempt is
    ``min(max_delay, base_delay * multiplier**(k-1))``, scaled by a uniform
    factor in ``[1-jitter, 1+jitter]`` so that retries of a burst spread out.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=5, ge=1)
    base_delay: float = Field(default=0.1, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=30.0, ge=0)
    jitter: float = Field(default=0.2, ge=0, le=1)

    def delay_for(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = min(self.max_delay, self.base_delay * self.multiplier ** max(0, attempt - 1))
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Route(Generic[M]):
    """Events of ``event_type`` (all types when None), parsed as ``model``, for ``handler``."""

    event_type: str | None
    model: type[M]
    handler: Handler[M]


@dataclass(slots=True)
class Incoming:
    """A decoded message on its way through the middleware to its handler.

    ``items`` is scratch space for middleware (a transaction, a span) so that
    layers can hand things inward without changing the handler's signature.
    """

    delivery: Delivery
    envelope: Envelope
    route: Route[Any]
    body: BaseModel
    items: dict[str, Any] = field(default_factory=dict)


ConsumeApp = Callable[[Incoming], Awaitable[None]]
"""The inner part of the onion: returns on success, raises on failure."""

ConsumeMiddleware = Callable[[ConsumeApp], ConsumeApp]
"""Wraps an inner app (Starlette's shape): ``class Timing: def __init__(self, app): ...``."""

DeadLetterHook = Callable[[Delivery, DeadLetterReason, Failure], Awaitable[None]]

current_incoming: ContextVar[Incoming | None] = ContextVar("wirework_incoming", default=None)
"""The message the running handler is handling, if any (each handler has its own task)."""


async def dispatch(incoming: Incoming) -> None:
    """The innermost app: call the route's handler."""
    await incoming.route.handler(incoming.body, incoming.envelope)


@dataclass
class ConsumerStats:
    """Counts since start; ``in_flight`` is the handlers running right now."""

    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


class Consumer:
    """One consumer of ``subscription.group``, running at most ``concurrency`` handlers.

    Run it with ``await consumer.run()`` inside the owner's task group; stop it
    with ``await consumer.stop(grace=...)``: fetching stops at once, running
    handlers get ``grace`` seconds, the rest are cancelled and handed back.
    """

    def __init__(
        self,
        broker: Broker,
        subscription: Subscription,
        *,
        routes: Sequence[Route[Any]],
        retry: RetryPolicy | None = None,
        concurrency: int = 1,
        middleware: Sequence[ConsumeMiddleware] = (),
        on_dead_letter: DeadLetterHook | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        if concurrency > subscription.prefetch:
            raise ConfigurationError(
                f"concurrency {concurrency} is above prefetch {subscription.prefetch}: "
                f"handlers would wait for deliveries; raise prefetch to at least {concurrency}"
            )
        if not routes:
            raise ConfigurationError("a consumer needs at least one Route")
        self.broker = broker
        self.subscription = subscription
        self.retry = retry or RetryPolicy()
        self.concurrency = concurrency
        self.stats = ConsumerStats()
        self._routes: dict[str | None, Route[Any]] = {r.event_type: r for r in routes}
        app: ConsumeApp = dispatch
        for layer in reversed(middleware):
            app = layer(app)
        self._app = app
        self._on_dead_letter = on_dead_letter
        self._clock = clock or SYSTEM_CLOCK
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self._grace = 5.0
        self._grace_cut = asyncio.Event()
        self._done = asyncio.Event()
        self._acks: set[asyncio.Future[None]] = set()
        """Acks of handled messages on their way to the broker (see ``_ack``)."""
        self._ack_limit = subscription.prefetch
        self._ack_room = asyncio.Event()

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop fetching, give running handlers ``grace`` seconds, and wait for ``run`` to end."""
        self.stop_taking(grace=grace)
        await self._done.wait()

    def stop_taking(self, *, grace: float = 5.0) -> None:
        """Begin ``stop`` now, without waiting: no handler starts after this call returns.

        For an owner that decides to stop outside a coroutine (a signal handler, a
        runner's stop request): a worker that finishes its handler reads the next
        delivery without waiting when the subscription has one ready, so a stop that
        arrived a loop iteration later would let it start.
        """
        if not self._stop.is_set():
            self._grace = grace
            self._stop.set()
        elif grace < self._grace:
            self._grace = grace  # a forced stop after a graceful one: handlers wait less
            self._grace_cut.set()

    async def run(self) -> None:
        """Consume until ``stop`` or cancellation; never returns early on a bad message.

        A *retriable* broker error (a lost connection, a locked file) ends only
        the current subscription: the consumer subscribes again after a backoff
        (50 ms doubling to 5 s), so a transient fault never stops it for good.
        """
        # Workers take turns at reading the subscription, and the one that read a delivery
        # handles it itself: it reaches its handler with no task switch (a reader task
        # feeding a queue cost one on the way to an idle handler: request-reply latency).
        # The reader wakes one waiting worker to read next, and only one woken worker is
        # on its way at a time, so while deliveries come without waiting, one worker reads
        # and handles them and the others sleep. A lock taken in turn (first come first
        # served, a future each time) cost a switch a message: 52 instead of 31 us of event
        # loop a message with 8 workers once acks no longer held them (SQLite, fast,
        # window 100). At most ``concurrency`` deliveries are in hand.
        try:
            deliveries = self.broker.subscribe(self.subscription)
        except BaseException:
            self._done.set()  # stop() must not wait for a run that never began
            raise
        loop = asyncio.get_running_loop()
        waiting: deque[asyncio.Future[None]] = deque()
        busy: set[asyncio.Task[None]] = set()
        reader: asyncio.Task[None] | None = None
        woken = False
        pause = _RESUBSCRIBE_FIRST

        async def next_delivery() -> Delivery | None:
            nonlocal deliveries, pause
            while True:
                try:
                    return await anext(deliveries)
                except StopAsyncIteration:
                    return None
                except BrokerError as exc:
                    if not exc.retriable or self._stop.is_set():
                        raise
                    log.warning(
                        "subscription to %s/%s failed (%s); subscribing again in %.2fs",
                        self.subscription.topic,
                        self.subscription.group,
                        exc,
                        pause,
                    )
                    await self._pause(pause)
                    pause = min(pause * 2, _RESUBSCRIBE_MAX)
                    if self._stop.is_set():
                        return None
                    deliveries = self.broker.subscribe(self.subscription)

        def wake_one() -> None:
            nonlocal woken
            while waiting:
                follower = waiting.popleft()
                if not follower.done():
                    follower.set_result(None)
                    woken = True
                    return

        async def work() -> None:
            nonlocal reader, woken
            me = asyncio.current_task()
            assert me is not None
            while not self._stop.is_set():
                if reader is not None:
                    turn: asyncio.Future[None] = loop.create_future()
                    waiting.append(turn)
                    await turn
                    woken = False
                    continue
                reader = me
                try:
                    delivery = await next_delivery()
                finally:
                    reader = None
                if delivery is None:
                    self._stop.set()  # the subscription ended: so does this consumer
                    return
                if self._stop.is_set():
                    return  # not started: handed back when the iteration closes
                if not woken:
                    wake_one()  # to read while this one handles
                busy.add(me)
                try:
                    await self._handle(delivery)
                finally:
                    busy.discard(me)

        try:
            async with asyncio.TaskGroup() as tasks:
                workers = {tasks.create_task(work()) for _ in range(self.concurrency)}
                await self._stop.wait()
                for worker in workers - busy - {reader}:
                    worker.cancel()  # waiting for its turn to read
                await self._wait_out_grace(busy)
                late = set(busy)
                for worker in late:
                    worker.cancel()
                if late:
                    await asyncio.wait(late)
                if reader is not None:
                    reader.cancel()  # the pending read, cancelled once handlers are done
        finally:
            # The acks of handled messages go in before the iteration closes, and closing
            # it hands back whatever it still held, after the handlers.
            if self._acks:
                await asyncio.wait(set(self._acks))
            with contextlib.suppress(Exception):
                await deliveries.aclose()
            self._done.set()

    async def _wait_out_grace(self, busy: set[asyncio.Task[None]]) -> None:
        """Until the running handlers end or grace is over, a grace cut short included."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while busy:
            left = began + self._grace - loop.time()
            if left <= 0:
                return
            self._grace_cut.clear()
            cut = loop.create_task(self._grace_cut.wait())
            try:
                await asyncio.wait([*busy, cut], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cut.cancel()

    async def _pause(self, seconds: float) -> None:
        await wait_first(self._stop, clock=self._clock, pause=seconds)

    async def _handle(self, delivery: Delivery) -> None:
        self.stats.in_flight += 1
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            if not delivery.settled:
                with contextlib.suppress(Exception):
                    await asyncio.shield(delivery.nack(delay=0.0))
            raise
        except BrokerError as exc:
            # Settling failed; the lease will run out and the message comes back.
            log.warning(
                "could not settle message on %s/%s: %s", delivery.topic, delivery.group, exc
            )
        finally:
            self.stats.in_flight -= 1

    async def _process(self, delivery: Delivery) -> None:
        if FAULTS_ARMED:
            fault_point("consume.after_receive")
        if delivery.exceeds(self.broker.max_message_bytes):
            await self._dead_letter(
                delivery,
                DeadLetterReason.TOO_LARGE,
                Failure(
                    error_type="wirework.errors.MessageTooLargeError",
                    message=f"{delivery.message.size} bytes, limit {self.broker.max_message_bytes}",
                ),
            )
            return
        try:
            envelope = decode_wire(delivery.message)
            route = self._routes.get(envelope.type) or self._routes.get(None)
            if route is None:
                raise UnknownMessageTypeError(
                    f"no handler for event type {envelope.type!r} on "
                    f"{delivery.topic}/{delivery.group}; known: {self._known_types()}"
                )
            body: BaseModel = envelope.decode(route.model)
        except DecodeError as exc:
            await self._dead_letter(delivery, _decode_reason(exc), Failure.from_exception(exc))
            return
        if FAULTS_ARMED:
            fault_point("consume.after_deserialize")
        incoming = Incoming(delivery=delivery, envelope=envelope, route=route, body=body)
        token = current_incoming.set(incoming)
        try:
            await self._app(incoming)
        except Reject as exc:
            await self._dead_letter(
                delivery, DeadLetterReason.REJECTED, Failure.from_exception(exc)
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(delivery, exc)
            return
        finally:
            current_incoming.reset(token)
        if FAULTS_ARMED:
            fault_point("consume.after_handler")
            fault_point("consume.after_commit_before_ack")
        # Ack; where the backend can begin an ack and finish it later, without waiting.
        # The ack keeps its promise: the message counts as handled only once the
        # broker holds the ack, and a crash before that means redelivery. But the
        # handler's slot takes the next message at once instead of idling through
        # the broker's round trip, so acks of many messages share it: on SQLite
        # (fast, one producer, 8 handlers) 1 commit per 16 messages instead of 8,
        # and a consumer with one handler no longer pays a commit a message. At
        # most ``prefetch`` acks are on their way; ``run`` waits for all of them
        # before it hands back the rest. Inline, not a coroutine of its own: one
        # coroutine less a message (about 2k instructions, bench.instructions).
        if len(self._acks) >= self._ack_limit:
            await self._room_for_an_ack()
        acking = delivery.start_ack()
        if acking is None:
            await delivery.ack()
            self._count_ack()
            return
        self._acks.add(acking)
        acking.add_done_callback(lambda done: self._acked(delivery, done))

    async def _room_for_an_ack(self) -> None:
        while len(self._acks) >= self._ack_limit:
            self._ack_room.clear()
            await self._ack_room.wait()

    def _acked(self, delivery: Delivery, acking: asyncio.Future[None]) -> None:
        self._acks.discard(acking)
        if len(self._acks) >= self._ack_limit - 1:
            self._ack_room.set()  # it was full: ``_room_for_an_ack`` may be waiting
        if acking.cancelled():
            return
        error = acking.exception()
        if isinstance(error, BrokerError):
            self._ack_failed(delivery, error)
            return
        if error is not None:
            log.error(
                "ack of a message on %s/%s failed", delivery.topic, delivery.group, exc_info=error
            )
            return
        self._count_ack()

    def _count_ack(self) -> None:
        self.stats.handled += 1
        if FAULTS_ARMED:
            fault_point("consume.after_ack")

    def _ack_failed(self, delivery: Delivery, exc: BrokerError) -> None:
        # The lease will run out and the message comes back.
        log.warning("could not ack message on %s/%s: %s", delivery.topic, delivery.group, exc)

    def _known_types(self) -> list[str]:
        return sorted(name for name in self._routes if name is not None)

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        self.stats.failed += 1
        failure = Failure.from_exception(exc)
        if delivery.attempt >= self.retry.max_attempts:
            await self._dead_letter(delivery, DeadLetterReason.MAX_DELIVERIES, failure)
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
        if delay is None:
            delay = self.retry.delay_for(delivery.attempt, self._rng)
        log.info(
            "attempt %d of %s on %s/%s failed (%s); retrying in %.3fs",
            delivery.attempt,
            delivery.message.message_id,
            delivery.topic,
            delivery.group,
            failure.error_type,
            delay,
        )
        await delivery.nack(delay=delay, error=failure)
        self.stats.retried += 1

    async def _dead_letter(
        self, delivery: Delivery, reason: DeadLetterReason, failure: Failure
    ) -> None:
        log.warning(
            "dead-lettering %s on %s/%s: %s (%s)",
            delivery.message.message_id,
            delivery.topic,
            delivery.group,
            reason.value,
            failure.message,
        )
        await delivery.dead_letter(reason, failure)
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[reason.value] = (
            self.stats.dead_letter_reasons.get(reason.value, 0) + 1
        )
        if self._on_dead_letter is not None:
            try:
                await self._on_dead_letter(delivery, reason, failure)
            except Exception:
                # The message is safe in the dead letters; only the notification failed.
                log.exception("on_dead_letter hook failed for %s", delivery.message.message_id)


def _decode_reason(exc: DecodeError) -> DeadLetterReason:
    if isinstance(exc, SchemaValidationError):
        return DeadLetterReason.SCHEMA_VALIDATION
    if isinstance(exc, UnknownMessageTypeError):
        return DeadLetterReason.UNKNOWN_MESSAGE_TYPE
    return DeadLetterReason.DESERIALIZATION_ERROR
