"""Retry: only safe calls, only retryable errors, within the budget, never past the deadline."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirework.clock import ManualClock
from wirework.errors import (
    BrokerUnavailableError,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    RetryBudgetExhaustedError,
    SchemaValidationError,
)
from wirework.resilience import (
    Deadline,
    Retry,
    RetryBudgetSettings,
    RetrySettings,
    StopReason,
    deadline_scope,
    is_idempotent_method,
)

from .driving import RecordingClock, drive


class Upstream:
    """A target that fails every call with ``error`` (after ``latency`` on the clock)."""

    def __init__(
        self, clock: ManualClock, error: Exception | None = None, latency: float = 0.0
    ) -> None:
        self.clock = clock
        self.error = error or BrokerUnavailableError("upstream down")
        self.latency = latency
        self.started: list[float] = []

    async def __call__(self) -> str:
        self.started.append(self.clock.monotonic())
        if self.latency:
            await self.clock.sleep(self.latency)
        raise self.error


def fast_retry(clock: ManualClock, **settings: object) -> Retry:
    """Retry with zero backoff, so attempts follow each other at the same instant."""
    values: dict[str, object] = {"max_attempts": 3, "base_delay": 0.0, "max_delay": 0.0}
    values.update(settings)
    return Retry(RetrySettings.model_validate(values), clock=clock, rng=random.Random(1))


async def test_a_call_without_idempotency_or_key_is_never_retried() -> None:
    """A retryable failure of a non-idempotent call without a key gets exactly one attempt."""
    clock = ManualClock()
    upstream = Upstream(clock)
    retry = fast_retry(clock, max_attempts=5)

    with pytest.raises(BrokerUnavailableError) as caught:
        await retry.call(upstream)

    assert len(upstream.started) == 1
    assert retry.stats.stopped == {StopReason.NOT_IDEMPOTENT: 1}
    assert any("idempotency key" in note for note in caught.value.__notes__)


@pytest.mark.parametrize(
    ("flags", "attempts"),
    [
        ({}, 1),
        ({"idempotent": False, "idempotency_key": None}, 1),
        ({"idempotent": True}, 4),
        ({"idempotency_key": "order-17"}, 4),
    ],
)
async def test_only_idempotent_or_keyed_calls_are_retried(
    flags: dict[str, object], attempts: int
) -> None:
    """idempotent=True or an idempotency key opens retries; nothing else does."""
    clock = ManualClock()
    upstream = Upstream(clock)
    retry = fast_retry(clock, max_attempts=4)

    with pytest.raises(BrokerUnavailableError):
        await retry.call(upstream, **flags)  # type: ignore[arg-type]

    assert len(upstream.started) == attempts


async def test_a_blank_idempotency_key_is_refused() -> None:
    """An empty key would make a call retryable without protecting it."""
    clock = ManualClock()
    upstream = Upstream(clock)

    with pytest.raises(ConfigurationError, match="idempotency_key is blank"):
        await fast_retry(clock).call(upstream, idempotency_key="  ")
    assert upstream.started == []


def test_idempotent_http_methods() -> None:
    """GET, PUT, DELETE … are idempotent by definition; POST and PATCH are not."""
    assert all(is_idempotent_method(m) for m in ("GET", "head", "PUT", "DELETE", "OPTIONS"))
    assert not any(is_idempotent_method(m) for m in ("POST", "PATCH", "post"))


async def test_errors_that_cannot_go_away_are_not_retried() -> None:
    """A non-retriable error, and any resilience refusal, ends the call at once."""
    clock = ManualClock()
    for error in (
        SchemaValidationError("bad body"),
        ValueError("a bug"),
        CircuitOpenError("open", retry_after=3.0),
        RetryBudgetExhaustedError("spent"),
    ):
        upstream = Upstream(clock, error)
        with pytest.raises(type(error)):
            await fast_retry(clock).call(upstream, idempotent=True)
        assert len(upstream.started) == 1, error


async def test_retry_if_adds_retryable_errors() -> None:
    """The caller's predicate makes errors of its choice retryable (here ConnectionError)."""
    clock = ManualClock()
    upstream = Upstream(clock, ConnectionResetError("reset by peer"))
    retry = Retry(
        RetrySettings(max_attempts=3, base_delay=0.0, max_delay=0.0),
        clock=clock,
        retry_if=lambda error: isinstance(error, ConnectionError),
    )

    with pytest.raises(ConnectionResetError) as caught:
        await retry.call(upstream, idempotent=True)

    assert len(upstream.started) == 3
    assert any("gave up after 3 attempts" in note for note in caught.value.__notes__)


async def test_success_after_failures_returns_the_result() -> None:
    """A transient failure is hidden from the caller, who gets the value."""
    clock = ManualClock()
    failures = 2

    async def flaky() -> str:
        nonlocal failures
        if failures:
            failures -= 1
            raise BrokerUnavailableError("blip")
        return "ok"

    retry = Retry(RetrySettings(max_attempts=3, base_delay=0.1), clock=clock)
    assert await drive(clock, retry.call(flaky, idempotent=True)) == "ok"
    assert (retry.stats.attempts, retry.stats.retries) == (3, 2)


async def test_retries_stay_within_the_budget_against_a_dead_upstream() -> None:
    """1000 calls to an upstream failing 100 %: 1000 + budget upstream calls, not 3000."""
    clock = ManualClock()
    upstream = Upstream(clock)
    retry = fast_retry(
        clock, budget=RetryBudgetSettings(ratio=0.2, min_per_second=1.0, window=10.0)
    )

    outcomes: dict[type[BaseException], int] = {}
    for _ in range(1000):
        try:
            await retry.call(upstream, idempotent=True)
        except Exception as exc:
            outcomes[type(exc)] = outcomes.get(type(exc), 0) + 1

    allowed_retries = 1.0 * 10.0 + 0.2 * 1000
    assert len(upstream.started) == 1000 + allowed_retries
    assert len(upstream.started) < 1000 * 3
    assert outcomes[RetryBudgetExhaustedError] > 0
    assert sum(outcomes.values()) == 1000


async def test_concurrent_calls_over_time_never_outspend_the_sliding_budget() -> None:
    """50 calls/s for 40 s, all failing, with real backoff: every window keeps the budget.

    Each retry is granted when an attempt fails, which (the upstream failing
    at once) is when that attempt started; the bound is checked at each grant,
    with the 9-to-10 s coverage of the slotted window (see test_backoff_budget).
    """
    clock = ManualClock()
    attempts: list[tuple[int, int, float]] = []  # (call, attempt, time)
    retry = Retry(
        RetrySettings(max_attempts=3, base_delay=0.2, max_delay=1.0),  # Linkerd's budget
        clock=clock,
        rng=random.Random(5),
    )

    async def one_call(call_id: int) -> None:
        attempt = 0

        async def upstream() -> None:
            nonlocal attempt
            attempt += 1
            attempts.append((call_id, attempt, clock.monotonic()))
            raise BrokerUnavailableError("down")

        with pytest.raises((BrokerUnavailableError, RetryBudgetExhaustedError)):
            await retry.call(upstream, idempotent=True)

    async def load() -> None:
        async with asyncio.TaskGroup() as group:
            for call_id in range(2000):
                group.create_task(one_call(call_id))
                await clock.sleep(0.02)

    await drive(clock, load())

    first = [t for _, n, t in attempts if n == 1]
    by_call = {(c, n): t for c, n, t in attempts}
    grants = sorted(by_call[(c, n - 1)] for c, n, _ in attempts if n > 1)
    assert len(first) == 2000
    assert 0 < len(grants) < 2000  # retries happened, and far fewer than 2 per call
    for index, now in enumerate(grants):
        recent_grants = sum(1 for g in grants[: index + 1] if now - 9 < g <= now)
        recent_calls = sum(1 for t in first if now - 10 < t <= now)
        assert recent_grants <= 10 * 10 + 0.2 * recent_calls + 1e-9, now


async def test_retry_never_starts_an_attempt_past_the_deadline() -> None:
    """With the deadline passed, Retry raises DeadlineExceededError and calls nothing."""
    clock = ManualClock()
    upstream = Upstream(clock)

    with deadline_scope(Deadline(1.0, clock, source="the caller")):
        await clock.advance(1.0)
        with pytest.raises(DeadlineExceededError, match=r"attempt 1 .* not started"):
            await fast_retry(clock).call(upstream, idempotent=True)

    assert upstream.started == []


@settings(max_examples=60, deadline=None)
@given(
    latency=st.floats(min_value=0.0, max_value=0.8),
    base_delay=st.floats(min_value=0.0, max_value=2.0),
    budget=st.floats(min_value=0.1, max_value=3.0),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_retry_never_sleeps_or_starts_past_the_deadline(
    latency: float, base_delay: float, budget: float, seed: int
) -> None:
    """Whatever the latency and backoff: every sleep ends and every attempt starts in time."""
    clock = RecordingClock()
    upstream = Upstream(clock, latency=latency)
    retry = Retry(
        RetrySettings(max_attempts=10, base_delay=base_delay, max_delay=5.0),
        clock=clock,
        rng=random.Random(seed),
    )

    async def scenario() -> None:
        with (
            deadline_scope(Deadline(budget, clock)),
            pytest.raises((BrokerUnavailableError, DeadlineExceededError)),
        ):
            await retry.call(upstream, idempotent=True)

    asyncio.run(drive(clock, scenario()))

    assert upstream.started
    assert all(start < budget for start in upstream.started)
    backoffs = list(clock.sleeps)
    if latency:
        for start in upstream.started:  # the upstream's own waits are not backoff
            backoffs.remove((start, latency))
    assert all(at + seconds < budget for at, seconds in backoffs)


async def test_an_attempt_cut_by_its_per_try_timeout_is_retried() -> None:
    """A per-try timeout cuts a hung attempt, and the next attempt gets its chance."""
    clock = ManualClock()
    hung = True

    async def sometimes_hangs() -> str:
        nonlocal hung
        if hung:
            hung = False
            await asyncio.Event().wait()
        return "second time lucky"

    retry = Retry(
        RetrySettings(max_attempts=3, base_delay=0.0, max_delay=0.0, per_try_timeout=0.5),
        clock=clock,
    )
    with deadline_scope(Deadline(10.0, clock)):
        result = await drive(clock, retry.call(sometimes_hangs, idempotent=True))

    assert result == "second time lucky"
    assert clock.monotonic() == 0.5
