"""Composition: the documented order, and what each policy does to the ones it wraps."""

from __future__ import annotations

import asyncio
import random

import pytest

from wirework.clock import ManualClock
from wirework.errors import (
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    ServiceUnavailableError,
)
from wirework.resilience import (
    Bulkhead,
    BulkheadSettings,
    CircuitBreaker,
    CircuitBreakerSettings,
    CircuitState,
    Fallback,
    Pipeline,
    Retry,
    RetrySettings,
    Timeout,
    build_pipelines,
    load_policies,
)

from .driving import drive, settle


class DeadTarget:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        raise ServiceUnavailableError("down")


def no_wait_retry(clock: ManualClock, attempts: int) -> Retry:
    return Retry(
        RetrySettings(max_attempts=attempts, base_delay=0.0, max_delay=0.0),
        clock=clock,
        rng=random.Random(2),
    )


async def test_an_open_breaker_stops_the_retries_of_the_call_at_once() -> None:
    """Retry around the breaker: once it opens, CircuitOpenError ends the call unretried."""
    clock = ManualClock()
    target = DeadTarget()
    policies = Pipeline(
        no_wait_retry(clock, attempts=10),
        CircuitBreaker(CircuitBreakerSettings(consecutive_failures=3), clock=clock),
    )

    with pytest.raises(CircuitOpenError):
        await policies.call(target, idempotent=True)

    assert target.calls == 3
    breaker = policies.find(CircuitBreaker)
    assert breaker is not None
    assert breaker.state is CircuitState.OPEN


async def test_the_outer_timeout_bounds_every_attempt_and_backoff() -> None:
    """Timeout outside Retry: the whole call, sleeps included, ends by the deadline."""
    clock = ManualClock()
    target = DeadTarget()
    policies = Pipeline(
        Timeout(1.0, clock=clock),
        Retry(RetrySettings(max_attempts=100, base_delay=0.2, max_delay=0.2), clock=clock),
    )

    with pytest.raises((ServiceUnavailableError, DeadlineExceededError)):
        await drive(clock, policies.call(target, idempotent=True))

    assert clock.monotonic() < 1.0
    assert 1 < target.calls < 100


async def test_fallback_outermost_answers_for_an_open_circuit() -> None:
    """Fallback replaces what the rest ends with; errors it does not name pass through."""
    clock = ManualClock()
    target = DeadTarget()
    breaker = CircuitBreaker(CircuitBreakerSettings(consecutive_failures=1), clock=clock)
    policies = Pipeline(Fallback(CircuitOpenError, value="cached"), breaker)

    with pytest.raises(ServiceUnavailableError):
        await policies.call(target)
    assert await policies.call(target) == "cached"

    async def made(error: Exception) -> str:
        return f"stand-in for {type(error).__name__}"

    computed = Pipeline(Fallback((CircuitOpenError,), function=made), breaker)
    assert await computed.call(target) == "stand-in for CircuitOpenError"
    assert target.calls == 1


def test_fallback_needs_exactly_one_stand_in() -> None:
    """Neither or both of value and function is a configuration error."""
    with pytest.raises(ConfigurationError):
        Fallback(CircuitOpenError)
    with pytest.raises(ConfigurationError):
        Fallback(CircuitOpenError, value=1, function=lambda error: 2)


async def test_fallback_never_swallows_cancellation() -> None:
    """Cancelling the caller is not an error to stand in for."""
    policies = Pipeline(Fallback(Exception, value="nope"))
    call = asyncio.ensure_future(policies.call(asyncio.Event().wait))
    await settle()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_the_bulkhead_holds_a_slot_per_attempt_not_during_backoff() -> None:
    """Innermost bulkhead of 1: another call gets through while the first backs off."""
    clock = ManualClock()
    first_failed = asyncio.Event()
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("first")
        if len(calls) == 1:
            first_failed.set()
            raise ServiceUnavailableError("blip")
        return "first"

    async def other() -> str:
        calls.append("other")
        return "other"

    bulkhead = Bulkhead(BulkheadSettings(max_concurrent=1, max_queued=0))
    policies = Pipeline(
        Retry(RetrySettings(max_attempts=2, base_delay=5.0, max_delay=5.0), clock=clock),
        bulkhead,
    )
    first = asyncio.ensure_future(policies.call(flaky, idempotent=True))
    await first_failed.wait()
    await settle()
    assert bulkhead.active == 0

    assert await policies.call(other) == "other"
    await clock.advance(5.0)
    assert await first == "first"


async def test_a_blank_key_is_refused_by_the_pipeline_itself() -> None:
    """The rule holds even for a pipeline without a Retry in it."""
    with pytest.raises(ConfigurationError):
        await Pipeline().call(DeadTarget(), idempotency_key="")


async def test_pipelines_built_from_a_policy_file_share_state_per_target() -> None:
    """build_pipelines makes one pipeline per target, in the documented order."""
    clock = ManualClock()
    policies = load_policies(
        "payments:\n"
        "  timeout: 2\n"
        "  retry: {max_attempts: 2, base_delay: 0, max_delay: 0}\n"
        "  circuit_breaker: {consecutive_failures: 4, minimum_calls: 4, window_size: 4}\n"
        "  bulkhead: {max_concurrent: 5}\n"
        "stock: {}\n"
    )
    pipelines = build_pipelines(policies, clock=clock)

    payments = pipelines["payments"]
    kinds = [type(policy) for policy in payments.policies]
    assert kinds == [Timeout, Retry, CircuitBreaker, Bulkhead]
    assert [type(policy) for policy in pipelines["stock"].policies] == [Timeout]

    target = DeadTarget()
    for _ in range(2):
        with pytest.raises((ServiceUnavailableError, CircuitOpenError)):
            await payments.call(target, idempotent=True)
    breaker = payments.find(CircuitBreaker)
    assert breaker is not None
    assert breaker.state is CircuitState.OPEN
    assert target.calls == 4
