"""A publisher killed mid-stream on SQLite: what it saw succeed is delivered, nothing else.

By ``kill -9`` at a random moment, and at the crash points around the commit of
its publishes (``publish.before_commit``, ``publish.after_commit``): the second
is the window, under strict, between the commit and the WAL's sync after it.
"""

from __future__ import annotations

import random

import pytest

from tests.helpers.harness import SEEDS, FaultRun, report
from wirework.faults import EXIT_CODE
from wirework.testing.conformance import wait_until

TASKS = 4


@pytest.mark.fault
@pytest.mark.parametrize("seed", SEEDS)
async def test_publisher_killed_mid_stream_loses_no_acknowledged_publish(
    run: FaultRun, seed: int
) -> None:
    """What a killed producer saw succeed is delivered, and nothing it never tried appears."""
    rng = random.Random(seed)
    kill_after = rng.randint(100, 600)
    consumer = run.consumer("c0", prefetch=50, concurrency=8)
    publisher = run.publisher("p0", count=1_000_000, rate=500, tasks=TASKS)

    await wait_until(
        lambda: len(run.records_of(publisher, "ok")) >= kill_after,
        30,
        what=f"{kill_after} acknowledged publishes",
    )
    publisher.kill()
    assert await publisher.exited(5) == -9
    result = await run.drain()

    elapsed = run.records_of(publisher, "invoke")
    rate = len(elapsed) / (max(elapsed) - min(elapsed))
    report(f"kill-publisher[seed={seed}]", result, publishes_per_s=rate)
    # Paced at 500/s, which an idle machine holds; the floor only says it was streaming.
    assert rate >= 100, f"the publisher was not streaming ({rate:.0f}/s)"
    assert consumer.alive, run.describe()
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    assert not result.failed, str(result)
    assert not result.failed_but_present, str(result)
    # At most one publish per producer task was in flight when the process died.
    assert len(result.indeterminate) <= TASKS, str(result)
    assert result.effected == result.acked | result.recovered, str(result)


@pytest.mark.fault
@pytest.mark.parametrize("point", ["publish.before_commit", "publish.after_commit"])
async def test_publisher_dying_at_its_commit_loses_no_acknowledged_publish(
    run: FaultRun, point: str
) -> None:
    """Dying around the 40th commit of its publishes: nothing it saw succeed is lost."""
    consumer = run.consumer("c0", prefetch=50, concurrency=8)
    publisher = run.publisher(
        "p0", count=1_000_000, rate=500, tasks=TASKS, fault_point=point, fault_every=40
    )
    assert await publisher.exited(30) == EXIT_CODE, f"{point} never fired\n{run.describe()}"
    result = await run.drain()

    report(f"publisher-at-{point}", result)
    assert consumer.alive, run.describe()
    assert result.acked, str(result)  # it was publishing before it died
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    assert not result.failed, str(result)
    assert len(result.indeterminate) <= TASKS, str(result)
    assert result.effected == result.acked | result.recovered, str(result)
    if point == "publish.after_commit":
        # The transaction it died after was committed: its publishes, never
        # answered, are delivered all the same.
        assert result.recovered, str(result)
