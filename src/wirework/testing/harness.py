"""Run services in-process on the memory broker and a manual clock, for fast tests.

::

    async with ServiceHarness(orders, inventory) as h:
        orders.override(Payments, FakePayments())
        await h.send("orders.place", PlaceOrder(order_id="o-1"))
        await h.settle()
        assert h.published("orders.events", OrderPlaced) == [OrderPlaced(order_id="o-1")]
        await h.advance(10)  # retries and delayed messages fall due; nothing sleeps

For the time it runs, each service uses one shared ``MemoryBroker`` and the
harness's ``ManualClock``, and a publish middleware records what it publishes;
on exit the services are stopped and get back their broker, clock, publish
middleware and dependency overrides, so a module-level service can serve many
tests. Nothing waits on real time: ``settle`` runs the event loop until no
work is left, and time moves only through ``advance`` (or a ``request``
waiting for its deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from pydantic import BaseModel

from wirework.brokers.base import DeadLetter, GroupStats
from wirework.brokers.memory import MemoryBroker
from wirework.clock import ManualClock
from wirework.consumer import current_incoming
from wirework.envelope import Envelope
from wirework.errors import ConfigurationError, WireworkError
from wirework.service.binding import Publish
from wirework.service.handlers import event_type
from wirework.service.service import Service

M = TypeVar("M", bound=BaseModel)

#: Consecutive idle loop iterations before ``settle`` believes it: a task just
#: woken (a caller whose reply came, a dead-letter hook about to answer) needs a
#: few turns before its next publish shows up in the broker.
QUIET_ITERATIONS = 20

#: Iterations with no visible change after which busy work counts as blocked
#: (a handler waiting on something that is not the clock).
STUCK_ITERATIONS = 200

#: Default bound on loop iterations per ``settle``; a few hundred thousand
#: messages' worth, and about a second of a livelocked test.
MAX_ITERATIONS = 50_000


class NotSettledError(WireworkError):
    """``settle`` ran out of iterations, or work stays busy without the clock moving."""


@dataclass(frozen=True, slots=True)
class Published:
    """One message a service published while the harness ran, as the broker accepted it."""

    service: str
    topic: str
    envelope: Envelope
    key: str | None
    delay: float


class _Capture:
    """A publish middleware that records each message after the broker accepted it."""

    def __init__(self, service: str, record: list[Published]) -> None:
        self._service = service
        self._record = record

    def __call__(self, app: Publish) -> Publish:
        async def publish(topic: str, envelope: Envelope, key: str | None, delay: float) -> None:
            await app(topic, envelope, key, delay)
            self._record.append(Published(self._service, topic, envelope, key, delay))

        return publish


class _HarnessClock:
    """The manual clock as the services see it, noting handlers that wait on it.

    A handler sleeping on the clock (a request's deadline, a pause) cannot
    finish until time moves, so ``settle`` counts it as done for now.
    """

    def __init__(self, clock: ManualClock) -> None:
        self.manual = clock
        self.waiting: dict[int, int] = {}
        """Sleep calls in progress, by the id of the handled message's ``Incoming``."""

    def monotonic(self) -> float:
        return self.manual.monotonic()

    def now(self) -> datetime:
        return self.manual.now()

    async def sleep(self, seconds: float) -> None:
        incoming = current_incoming.get()
        if incoming is None:
            await self.manual.sleep(seconds)
            return
        handler = id(incoming)
        self.waiting[handler] = self.waiting.get(handler, 0) + 1
        try:
            await self.manual.sleep(seconds)
        finally:
            self.waiting[handler] -= 1
            if not self.waiting[handler]:
                del self.waiting[handler]


@dataclass(frozen=True)
class _State:
    """What ``settle`` watches: the broker's groups and the handlers' progress."""

    groups: tuple[GroupStats, ...]
    progress: tuple[int, ...]
    running: int
    waiting: int

    @property
    def idle(self) -> bool:
        """Nothing ready, and every running handler waits on the clock.

        Fewer messages than waiting handlers may be in flight: a handler that
        outlived its lease holds nothing any more.
        """
        ready = sum(row.ready for row in self.groups if row.group is not None)
        held = sum(row.in_flight for row in self.groups)
        return ready == 0 and held <= self.waiting and self.running == self.waiting

    def describe(self) -> str:
        busy = [
            f"{row.topic}/{row.group}: {row.ready} ready, {row.in_flight} in flight"
            for row in self.groups
            if row.group is not None and (row.ready or row.in_flight)
        ]
        return "; ".join(busy) or f"{self.running - self.waiting} handler(s) still running"


class HarnessFactory(Protocol):
    """The ``service_harness`` fixture: a harness for some services on the test's clock."""

    def __call__(self, *services: Service) -> ServiceHarness: ...


class ServiceHarness:
    """Services started in-process on one memory broker and a manual clock.

    Args:
        *services: the services under test; each must be stopped. They are
            started in order and stopped in reverse.
        clock: the clock retries, leases, delays and deadlines run on; a new
            ``ManualClock`` if omitted.
        broker: a ``MemoryBroker`` on ``clock`` to use (it stays open); a new
            one, closed on exit, if omitted.
        max_iterations: loop iterations ``settle`` may take before it fails.

    Raises:
        ConfigurationError: a service is given twice, or ``broker`` runs on
            another clock (its delays would never fall due).
    """

    def __init__(
        self,
        *services: Service,
        clock: ManualClock | None = None,
        broker: MemoryBroker | None = None,
        max_iterations: int = MAX_ITERATIONS,
    ) -> None:
        if len({id(service) for service in services}) != len(services):
            raise ConfigurationError("a service is given to the harness twice")
        if clock is None:
            on_broker = broker.clock if broker is not None else None
            clock = on_broker if isinstance(on_broker, ManualClock) else ManualClock()
        if broker is not None and broker.clock is not clock:
            raise ConfigurationError(
                "the broker runs on another clock than the harness, so advance() would "
                "not move its delays and leases; build it with MemoryBroker(clock=clock)"
            )
        self.clock = clock
        self.broker = broker or MemoryBroker(clock=clock)
        self.client = Service("harness")
        """Publishes and requests on behalf of the test (``source`` is ``/harness``)."""
        self.captured: list[Published] = []
        """Everything the services and the test published, in order."""
        self.max_iterations = max_iterations
        self._services = services
        self._owns_broker = broker is None
        self._service_clock = _HarnessClock(self.clock)
        self._exit: contextlib.AsyncExitStack | None = None

    # -- running ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._exit is not None:
            raise ConfigurationError("this harness is already running")
        async with contextlib.AsyncExitStack() as stack:
            if self._owns_broker:
                stack.push_async_callback(self.broker.aclose)
            for service in (*self._services, self.client):
                self._adopt(service, stack)
                # Registered first, so a service that fails half-way through start is stopped.
                stack.push_async_callback(service.stop, grace=0.0)
                await service.start()
            await self._wait_for_groups()
            self._exit = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        exit_stack, self._exit = self._exit, None
        if exit_stack is not None:
            await exit_stack.aclose()

    def _adopt(self, service: Service, stack: contextlib.AsyncExitStack) -> None:
        """Point ``service`` at the harness, and register how to give it back its own."""
        overrides = service.overrides()
        capture = _Capture(service.name, self.captured)
        broker = service.use_broker(self.broker)
        clock = service.use_clock(self._service_clock)
        service.use_publish(capture)

        def restore() -> None:
            service.remove_publish(capture)
            service.reset_overrides(overrides)
            service.use_clock(clock)
            service.use_broker(broker)  # last: it refuses a service that failed to stop

        stack.callback(restore)

    async def _wait_for_groups(self) -> None:
        """Return once every handler's group exists, so no publish can miss a new group."""
        wanted = {(b.topic, b.group) for service in self._services for b in service.bindings}
        missing = wanted
        for _ in range(self.max_iterations):
            missing = wanted - {(row.topic, row.group) for row in await self.broker.stats()}
            if not missing:
                return
            await asyncio.sleep(0)
        raise NotSettledError(f"these consumers never subscribed: {sorted(missing)}")

    # -- acting as a client ---------------------------------------------------------

    async def publish(
        self, topic: str, event: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        """Publish ``event`` to ``topic`` as the test; returns the envelope (for lineage checks)."""
        return await self.client.publish(topic, event, key=key, delay=delay)

    async def send(
        self, queue: str, command: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        """Send ``command`` to ``queue`` as the test; returns the envelope."""
        return await self.client.send(queue, command, key=key, delay=delay)

    async def request(
        self, subject: str, body: BaseModel, *, returns: type[M], timeout: float = 5.0
    ) -> M:
        """Ask ``subject`` and return the reply, waiting as a caller would, on the clock.

        If the reply needs time to pass, or never comes, the clock moves on step
        by step (everything due at each step runs) up to the deadline: a request
        nobody answers raises ``RequestTimeoutError`` at once in real time.

        Raises:
            RequestTimeoutError: no reply by the deadline.
            RemoteError: the responder failed, or dead-lettered the request.
        """
        call = asyncio.ensure_future(
            self.client.request(subject, body, returns=returns, timeout=timeout)
        )
        try:
            await self._move_clock(self.clock.monotonic() + timeout, until=call)
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
        if call.cancelled():
            raise NotSettledError(f"the request to {subject!r} neither got a reply nor timed out")
        return call.result()

    # -- driving the loop and the clock -----------------------------------------------

    async def settle(self) -> None:
        """Run until nothing is ready or in flight anywhere; time does not move.

        Delayed messages and retries waiting out a backoff stay where they are
        (``advance`` moves time); a handler waiting on the clock counts as done
        for now.

        Raises:
            NotSettledError: work stays busy (a handler waits on something that
                is not the clock, or messages sit ready with no consumer free),
                or is still going after ``max_iterations``.
        """
        state = await self._run()
        if not state.idle:
            raise NotSettledError(
                f"the services did not settle: {state.describe()}; a handler that waits "
                f"on anything but the service's clock (an event, a real sleep) never does"
            )

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward, running everything that falls due on the way.

        Time moves from one due moment (a delay, a backoff, a lease, a
        deadline) to the next, and the services settle at each, so a retry
        scheduled during the advance also runs within it if it falls due in time.

        Raises:
            ConfigurationError: ``seconds`` is negative.
            NotSettledError: work is still going after ``max_iterations`` at a step.
        """
        if not seconds >= 0:
            raise ConfigurationError(f"cannot advance the clock by {seconds!r} seconds")
        await self._move_clock(self.clock.monotonic() + seconds)

    async def _move_clock(self, target: float, *, until: asyncio.Future[Any] | None = None) -> None:
        await self._run(until)
        while until is None or not until.done():
            due = self.clock.next_deadline()
            if due is None or due > target:
                break
            await self._step_to(due)
            await self._run(until)
        if until is None or not until.done():
            await self._step_to(target)
            await self._run(until)

    async def _step_to(self, moment: float) -> None:
        step = max(0.0, moment - self.clock.monotonic())
        if self.clock.monotonic() + step < moment:
            # Rounding: a step one ulp short would leave the sleeper at ``moment`` asleep.
            step = math.nextafter(step, math.inf)
        await self.clock.advance(step)

    async def _run(self, until: asyncio.Future[Any] | None = None) -> _State:
        """Turn the loop until idle (or ``until`` is done), or blocked; return the last state."""
        previous: _State | None = None
        unchanged = 0
        for _ in range(self.max_iterations):
            await asyncio.sleep(0)
            state = await self._state()
            unchanged = unchanged + 1 if state == previous else 0
            previous = state
            if until is not None and until.done():
                return state
            if unchanged >= (QUIET_ITERATIONS if state.idle else STUCK_ITERATIONS):
                return state
        raise NotSettledError(
            f"still busy after {self.max_iterations} loop iterations "
            f"(handlers publishing to each other forever?): "
            f"{previous.describe() if previous else 'no state'}"
        )

    async def _state(self) -> _State:
        consumers = {
            id(binding.consumer): binding.consumer
            for service in self._services
            for binding in service.bindings
            if binding.consumer is not None
        }
        progress: list[int] = [len(self.captured)]
        running = 0
        for consumer in consumers.values():
            stats = consumer.stats
            progress += (stats.handled, stats.failed, stats.retried, stats.dead_lettered)
            running += stats.in_flight
        for service in (*self._services, self.client):
            requests = service.request_stats
            progress += (requests.replied, requests.timed_out, requests.remote_errors)
        return _State(
            groups=tuple(await self.broker.stats()),
            progress=tuple(progress),
            running=running,
            waiting=len(self._service_clock.waiting),
        )

    # -- what happened ----------------------------------------------------------------

    def envelopes(self, topic: str | None = None) -> list[Envelope]:
        """The envelopes published (to ``topic``, or anywhere), in order, lineage included."""
        return [p.envelope for p in self.captured if topic is None or p.topic == topic]

    def published(self, topic: str, model: type[M]) -> list[M]:
        """The bodies of the ``model`` events published to ``topic``, in order.

        Other event types on the topic are left out; ``envelopes(topic)`` has them all.
        """
        kind = event_type(model)
        return [e.decode(model) for e in self.envelopes(topic) if e.type == kind]

    async def dead_letters(
        self, topic: str | None = None, *, group: str | None = None
    ) -> Sequence[DeadLetter]:
        """The broker's dead letters (of ``topic``, of ``group``), oldest first."""
        return await self.broker.dead_letters(topic=topic, group=group, limit=1_000_000)
