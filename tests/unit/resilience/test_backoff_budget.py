"""Full-jitter backoff and the retry budget: plain arithmetic over a passed-in time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirework.errors import ConfigurationError
from wirework.resilience.backoff import full_jitter
from wirework.resilience.budget import RetryBudget


@given(
    retry=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0, max_value=60, allow_nan=False),
    cap=st.floats(min_value=0, max_value=600, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_full_jitter_delays_stay_in_zero_to_the_capped_ceiling(
    retry: int, base: float, cap: float, seed: int
) -> None:
    """Every delay lies in [0, min(cap, base * 2**retry)], however many retries came before."""
    delay = full_jitter(retry, base=base, cap=cap, rng=random.Random(seed))

    assert 0 <= delay <= cap
    assert delay <= base * 2.0 ** min(retry, 64)


def test_full_jitter_uses_the_whole_range() -> None:
    """Delays spread over all of [0, ceiling], not around a nominal value."""
    rng = random.Random(3)
    delays = [full_jitter(2, base=1.0, cap=100.0, rng=rng) for _ in range(2000)]

    assert min(delays) < 0.2
    assert max(delays) > 3.8
    assert max(delays) <= 4.0


def test_budget_allows_the_reserve_plus_the_ratio_of_calls() -> None:
    """With no calls, min_per_second * window retries; each call adds ``ratio`` more."""
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)

    granted = sum(budget.try_spend(0.0) for _ in range(50))
    assert granted == 10

    for _ in range(100):
        budget.record_call(0.5)
    granted = sum(budget.try_spend(0.5) for _ in range(50))
    assert granted == 20
    assert budget.available(0.5) == pytest.approx(0.0)


def test_budget_recovers_once_the_window_slides_past() -> None:
    """Retries spent more than a window ago no longer count."""
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0)
    assert sum(budget.try_spend(0.0) for _ in range(20)) == 10
    assert not budget.try_spend(9.5)

    assert sum(budget.try_spend(10.0) for _ in range(20)) == 10


@given(
    events=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.5), st.booleans()),
        min_size=1,
        max_size=400,
    )
)
def test_budget_holds_over_every_sliding_window(events: list[tuple[float, bool]]) -> None:
    """At each granted retry at time t: retries in (t-9, t] <= reserve + ratio * calls in (t-10, t].

    The window is kept in ten slots, so it covers between 9 and 10 seconds;
    the bound is checked against the shorter span for retries and the longer
    one for calls, which the budget must satisfy either way.
    """
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
    now = 0.0
    calls: list[float] = []
    spends: list[float] = []
    for step, is_call in events:
        now += step
        if is_call:
            budget.record_call(now)
            calls.append(now)
        elif budget.try_spend(now):
            spends.append(now)
            recent_spends = sum(1 for s in spends if now - 9 < s <= now)
            recent_calls = sum(1 for c in calls if now - 10 < c <= now)
            assert recent_spends <= 10 + 0.2 * recent_calls + 1e-9


def test_budget_refuses_nonsense() -> None:
    """A negative ratio or rate, or an empty window, is a configuration error."""
    for kwargs in ({"ratio": -0.1}, {"min_per_second": -1.0}, {"window": 0.0}):
        with pytest.raises(ConfigurationError):
            RetryBudget(**kwargs)
