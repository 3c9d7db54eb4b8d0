"""Poison messages at scale on SQLite (RELIABILITY.md DEV-07, smaller)."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.helpers.harness import FaultRun, report
from tests.helpers.ledger_worker import GROUP, TOPIC
from wirework.brokers.base import DeadLetterReason

MESSAGES = 200
MAX_ATTEMPTS = 5
BASE_DELAY = 0.05
JITTER = 0.2
#: How late a retry may come: it queues behind the deliveries already prefetched, so on a
#: loaded machine it waits for up to a prefetch of healthy messages. Early is never allowed.
SLACK = 2.0


@pytest.mark.fault
async def test_poison_is_dead_lettered_after_max_attempts_without_blocking_the_rest(
    run: FaultRun,
) -> None:
    """Five always-failing messages among 200 get five attempts each and a dead letter; the rest
    flow past them."""
    rng = random.Random(7)
    poison = {f"p0-{n}" for n in rng.sample(range(150), 5)}
    publisher = run.publisher("p0", count=MESSAGES)
    assert await publisher.exited(30) == 0, run.describe()
    # A long lease: this test counts retries exactly, and on a loaded machine a 1 s lease
    # could run out under a slow handler and add a redelivery that is not a retry.
    run.consumer("c0", poison=poison, max_attempts=MAX_ATTEMPTS, base_delay=BASE_DELAY, lease=30.0)
    result = await run.drain()

    history = run.history()
    invoked = {one: sorted(r.at for r in history.of("invoked") if r.id == one) for one in poison}
    healthy_acks = sorted(r.at for r in history.of("acked"))
    # Healthy acks while each poison message waited for its retries; 0 would mean it blocked
    # them, unless every healthy message was done before the poison message was first tried.
    overtaking = {
        one: sum(1 for at in healthy_acks if times[0] < at < times[-1])
        for one, times in invoked.items()
    }
    blocked = [
        one
        for one, times in invoked.items()
        if overtaking[one] == 0 and any(at > times[0] for at in healthy_acks)
    ]
    first_invocation = min(r.at for r in history.of("invoked"))
    lateness = [
        gap - BASE_DELAY * 2 ** (k - 1) * (1 + JITTER)
        for times in invoked.values()
        for k, gap in enumerate((b - a for a, b in itertools.pairwise(times)), 1)
    ]
    report(
        "poison",
        result,
        min_overtaking=min(overtaking.values()),
        max_retry_lateness_s=max(lateness),
        healthy_done_after_s=healthy_acks[-1] - first_invocation,
        poison_done_after_s=max(times[-1] for times in invoked.values()) - first_invocation,
    )

    letters = await run.observer.dead_letters(topic=TOPIC, group=GROUP)
    assert {letter.message_id for letter in letters} == poison
    for letter in letters:
        assert letter.attempts == MAX_ATTEMPTS, letter
        assert letter.reason is DeadLetterReason.MAX_DELIVERIES, letter
        assert letter.error is not None
        assert letter.error.error_type == "builtins.RuntimeError", letter.error
    assert not result.lost, str(result)
    assert not result.unexpected, str(result)
    assert result.effected == result.acked - poison, str(result)
    assert all(result.invocations[one] == MAX_ATTEMPTS for one in poison), result.invocations
    assert result.redeliveries == len(poison) * (MAX_ATTEMPTS - 1), str(result)
    for one, times in invoked.items():
        for k, gap in enumerate((b - a for a, b in itertools.pairwise(times)), 1):
            delay = BASE_DELAY * 2 ** (k - 1)
            assert delay * (1 - JITTER) <= gap <= delay * (1 + JITTER) + SLACK, (one, k, gap)
    assert not blocked, f"healthy messages waited behind poison {blocked}: {overtaking}"
