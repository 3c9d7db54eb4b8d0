"""The circuit breaker: opens at its thresholds, probes after the cool-down, and says so."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wirework.clock import ManualClock
from wirework.errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceededError,
    NotFoundError,
    ServiceUnavailableError,
)
from wirework.resilience import (
    Circuit,
    CircuitBreaker,
    CircuitBreakerSettings,
    CircuitState,
    Transition,
)
from wirework.resilience.breaker import Permit

from .driving import settle


class Target:
    """An upstream whose health the test switches; counts the calls that reach it."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if not self.healthy:
            raise ServiceUnavailableError("down")
        return "ok"


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state now (a call, so mypy does not carry one assert's narrowing on)."""
    return breaker.state


async def fail_times(breaker: CircuitBreaker, target: Target, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ServiceUnavailableError):
            await breaker.call(target)


async def test_opens_exactly_at_the_consecutive_failure_threshold() -> None:
    """Failure 4 of 5 leaves it closed; failure 5 opens it; call 6 never reaches the target."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=5, window_size=100, minimum_calls=100),
        clock=clock,
        name="payments",
    )
    target = Target()

    await fail_times(breaker, target, 4)
    assert state_of(breaker) is CircuitState.CLOSED
    await fail_times(breaker, target, 1)
    assert state_of(breaker) is CircuitState.OPEN

    with pytest.raises(CircuitOpenError, match="'payments' is open") as caught:
        await breaker.call(target)
    assert target.calls == 5
    assert caught.value.retry_after == 5.0
    assert (breaker.stats.calls, breaker.stats.failures, breaker.stats.rejections) == (5, 5, 1)


async def test_a_success_resets_the_consecutive_count() -> None:
    """Four failures, a success, four failures: never five in a row, so still closed."""
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=5, window_size=100, minimum_calls=100),
        clock=ManualClock(),
    )
    target = Target()
    await fail_times(breaker, target, 4)
    target.healthy = True
    await breaker.call(target)
    target.healthy = False
    await fail_times(breaker, target, 4)

    assert state_of(breaker) is CircuitState.CLOSED


async def test_opens_exactly_at_the_failure_rate_once_the_window_has_its_minimum() -> None:
    """Window 10, minimum 10, rate 0.7: opens on the call that makes 7 failures of 10."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(
            window_size=10, minimum_calls=10, failure_rate=0.7, consecutive_failures=None
        ),
        clock=clock,
    )
    target = Target()

    # 6 failures in the first 9 calls: never 7 of 10, and the minimum is not reached.
    for index in range(9):
        target.healthy = index % 3 == 2
        with contextlib.suppress(ServiceUnavailableError):
            await breaker.call(target)
    assert breaker.circuit.window == (9, 6)
    assert state_of(breaker) is CircuitState.CLOSED

    target.healthy = False
    await fail_times(breaker, target, 1)
    assert state_of(breaker) is CircuitState.OPEN
    assert breaker.circuit.transitions[-1].reason == "7 of the last 10 calls failed"


def test_a_success_that_fills_the_minimum_can_trip_the_rate() -> None:
    """ok, fail, fail, ok: the fourth call (a success) reaches the minimum at 50 % failed."""
    circuit = Circuit(
        CircuitBreakerSettings(
            window_size=4, minimum_calls=4, failure_rate=0.5, consecutive_failures=None
        )
    )
    for failed in (False, True, True, False):
        permit = circuit.admit(0.0)
        assert permit is not None
        if failed:
            circuit.record_failure(permit, 0.0)
        else:
            circuit.record_success(permit, 0.0)

    assert circuit.state is CircuitState.OPEN


async def test_one_probe_after_the_cooldown_and_success_closes() -> None:
    """Open for the cool-down, then exactly one probe; other callers are rejected meanwhile."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=2, cooldown=2.0), clock=clock
    )
    target = Target()
    await fail_times(breaker, target, 2)

    await clock.advance(1.99)
    with pytest.raises(CircuitOpenError):
        await breaker.call(target)
    await clock.advance(0.01)
    assert state_of(breaker) is CircuitState.HALF_OPEN

    release = asyncio.Event()

    async def slow_probe() -> str:
        target.calls += 1
        await release.wait()
        return "ok"

    probe = asyncio.ensure_future(breaker.call(slow_probe))
    await settle()
    with pytest.raises(CircuitOpenError, match="probe is in flight"):
        await breaker.call(target)
    assert target.calls == 3  # two failures, then the probe alone

    release.set()
    assert await probe == "ok"
    assert state_of(breaker) is CircuitState.CLOSED
    states = [(t.previous, t.state) for t in breaker.circuit.transitions]
    assert states == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


async def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    """The probe fails: open again, with the cool-down counted from then."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=1, cooldown=3.0), clock=clock
    )
    target = Target()
    await fail_times(breaker, target, 1)
    await clock.advance(3.0)

    await fail_times(breaker, target, 1)  # the probe

    assert state_of(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(target)
    assert caught.value.retry_after == 3.0
    assert target.calls == 2


async def test_listeners_hear_every_transition_and_a_failing_listener_is_contained() -> None:
    """Transitions reach listeners with their times; a broken listener breaks nothing."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=1, cooldown=1.0), clock=clock
    )
    heard: list[Transition] = []

    def broken(transition: Transition) -> None:
        raise RuntimeError("metrics backend away")

    breaker.add_listener(broken)
    breaker.add_listener(heard.append)
    target = Target()

    await fail_times(breaker, target, 1)
    await clock.advance(1.5)
    target.healthy = True
    await breaker.call(target)

    assert [(t.state, t.at) for t in heard] == [
        (CircuitState.OPEN, 0.0),
        (CircuitState.HALF_OPEN, 1.5),
        (CircuitState.CLOSED, 1.5),
    ]
    assert (breaker.stats.opened, breaker.stats.half_opened, breaker.stats.closed) == (1, 1, 1)


async def test_client_errors_and_local_refusals_do_not_count_against_the_target() -> None:
    """A 404 is the target answering; a full bulkhead is ours: neither opens the circuit."""
    breaker = CircuitBreaker(CircuitBreakerSettings(consecutive_failures=1), clock=ManualClock())

    for error in (NotFoundError("no such order"), BulkheadFullError("full")):

        async def refuse(error: Exception = error) -> None:
            raise error

        with pytest.raises(type(error)):
            await breaker.call(refuse)
    assert state_of(breaker) is CircuitState.CLOSED

    async def too_slow() -> None:
        raise DeadlineExceededError("cut")

    with pytest.raises(DeadlineExceededError):
        await breaker.call(too_slow)
    assert state_of(breaker) is CircuitState.OPEN  # a timeout does count


async def test_a_cancelled_probe_frees_its_place() -> None:
    """A probe cancelled mid-call leaves no outcome; the next caller becomes the probe."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=1, cooldown=1.0), clock=clock
    )
    target = Target()
    await fail_times(breaker, target, 1)
    await clock.advance(1.0)

    probe = asyncio.ensure_future(breaker.call(asyncio.Event().wait))
    await settle()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    target.healthy = True
    assert await breaker.call(target) == "ok"
    assert state_of(breaker) is CircuitState.CLOSED


def test_a_late_outcome_from_an_older_state_moves_nothing() -> None:
    """A call admitted while closed that fails after the circuit opened is not the probe."""
    circuit = Circuit(CircuitBreakerSettings(consecutive_failures=1, cooldown=1.0))
    slow = circuit.admit(0.0)
    fast = circuit.admit(0.0)
    assert slow is not None
    assert fast is not None
    circuit.record_failure(fast, 0.1)
    assert circuit.poll(1.2) is CircuitState.HALF_OPEN

    circuit.record_failure(slow, 1.3)

    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.admit(1.3) is not None  # the probe's place is still free


class CircuitMachine(RuleBasedStateMachine):
    """Random calls, outcomes and time against the rules every circuit must keep."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = CircuitBreakerSettings(
            window_size=6, minimum_calls=4, failure_rate=0.5, consecutive_failures=3,
            cooldown=2.0, half_open_probes=2,
        )  # fmt: skip
        self.circuit = Circuit(self.settings)
        self.now = 0.0
        self.open_since: float | None = None
        self.outstanding: list[tuple[int, Permit]] = []  # (generation admitted in, permit)
        self.generation = 0  # moves on every transition
        self.ended = 0
        self.circuit.add_listener(self.check_transition)

    def check_transition(self, transition: Transition) -> None:
        allowed = {
            (CircuitState.CLOSED, CircuitState.OPEN),
            (CircuitState.OPEN, CircuitState.HALF_OPEN),
            (CircuitState.HALF_OPEN, CircuitState.OPEN),
            (CircuitState.HALF_OPEN, CircuitState.CLOSED),
        }
        assert (transition.previous, transition.state) in allowed
        if transition.state is CircuitState.HALF_OPEN:
            assert self.open_since is not None
            assert transition.at >= self.open_since + self.settings.cooldown
        self.open_since = transition.at if transition.state is CircuitState.OPEN else None
        self.generation += 1

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def call(self) -> None:
        state = self.circuit.poll(self.now)
        probes = sum(1 for g, p in self.outstanding if p.probe and g == self.generation)
        permit = self.circuit.admit(self.now)
        if state is CircuitState.OPEN:
            assert permit is None
        if state is CircuitState.CLOSED:
            assert permit is not None
        if permit is not None:
            if permit.probe:
                assert probes < self.settings.half_open_probes
            self.outstanding.append((self.generation, permit))

    @precondition(lambda self: self.outstanding)
    @rule(index=st.integers(min_value=0), outcome=st.sampled_from(["ok", "fail", "cancel"]))
    def finish(self, index: int, outcome: str) -> None:
        _, permit = self.outstanding.pop(index % len(self.outstanding))
        if outcome == "ok":
            self.circuit.record_success(permit, self.now)
        elif outcome == "fail":
            self.circuit.record_failure(permit, self.now)
        else:
            self.circuit.release(permit)
        self.ended += 1

    @invariant()
    def counts_add_up(self) -> None:
        stats = self.circuit.stats
        assert stats.calls == self.ended + len(self.outstanding)
        assert stats.successes + stats.failures <= stats.calls
        calls, failures = self.circuit.window
        assert 0 <= failures <= calls <= self.settings.window_size

    @invariant()
    def closed_means_below_both_thresholds(self) -> None:
        if self.circuit.state is CircuitState.CLOSED:
            calls, failures = self.circuit.window
            assert calls < 4 or failures / calls < 0.5


CircuitMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_circuit_state_machine = CircuitMachine.TestCase


async def test_a_broken_failure_predicate_still_settles_the_probe() -> None:
    """is_failure raising counts as a failure, so the probe's place is never lost."""
    clock = ManualClock()

    def broken(error: Exception) -> bool:
        raise RuntimeError("predicate bug")

    breaker = CircuitBreaker(
        CircuitBreakerSettings(consecutive_failures=1, cooldown=1.0),
        clock=clock,
        is_failure=broken,
    )
    target = Target()
    await fail_times(breaker, target, 1)
    assert state_of(breaker) is CircuitState.OPEN
    await clock.advance(1.0)

    await fail_times(breaker, target, 1)  # the probe: counted, the circuit reopens

    assert state_of(breaker) is CircuitState.OPEN
    await clock.advance(1.0)
    target.healthy = True
    assert await breaker.call(target) == "ok"
