"""The backoff schedule is pure arithmetic: tested without a loop or a sleep."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from wirework.consumer import RetryPolicy


def test_delays_grow_exponentially_within_the_jitter_envelope() -> None:
    """Delay k lies in [base*2^(k-1)*(1-j), base*2^(k-1)*(1+j)] (RELIABILITY DEV-12)."""
    policy = RetryPolicy(base_delay=0.1, multiplier=2.0, jitter=0.2, max_delay=100)
    rng = random.Random(7)
    for attempt in range(1, 8):
        nominal = 0.1 * 2 ** (attempt - 1)
        for _ in range(200):
            delay = policy.delay_for(attempt, rng)
            assert nominal * 0.8 <= delay <= nominal * 1.2


def test_jitter_spreads_delays() -> None:
    """With jitter, a burst of retries does not fire in lockstep."""
    policy = RetryPolicy(base_delay=1.0, jitter=0.5)
    rng = random.Random(1)
    delays = {round(policy.delay_for(1, rng), 6) for _ in range(50)}
    assert len(delays) > 40


def test_max_delay_caps_the_schedule() -> None:
    """No delay exceeds max_delay * (1 + jitter), however many attempts."""
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, jitter=0.0)
    assert policy.delay_for(50, random.Random()) == 5.0


def test_invalid_policy_is_refused() -> None:
    """A policy that cannot work (zero attempts, negative delay) is refused up front."""
    with pytest.raises(ValidationError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValidationError):
        RetryPolicy(base_delay=-1)
