"""SIGTERM to a busy consumer on SQLite (RELIABILITY.md DEV-04)."""

from __future__ import annotations

import time

import pytest

from tests.helpers.harness import FaultRun, report
from wirework.testing.conformance import wait_until

PREFETCH = 10
CONCURRENCY = 4
HANDLER_SLEEP = 0.5
#: Long, so that whatever comes back before the test ends was handed back, not timed out.
LONG_LEASE = 30.0


@pytest.mark.fault
@pytest.mark.parametrize(
    "grace",
    [pytest.param(2.0, id="finish-in-grace"), pytest.param(0.2, id="hand-back-after-grace")],
)
async def test_sigterm_stops_fetching_settles_in_flight_and_exits_within_grace(
    run: FaultRun, grace: float
) -> None:
    """On SIGTERM a consumer stops fetching, finishes or hands back its work, and exits 0."""
    publisher = run.publisher("p0", count=100)
    assert await publisher.exited(30) == 0, run.describe()
    consumer = run.consumer(
        "c0",
        lease=LONG_LEASE,
        prefetch=PREFETCH,
        concurrency=CONCURRENCY,
        handler_sleep=HANDLER_SLEEP,
        grace=grace,
    )
    await wait_until(
        lambda: len(run.records_of(consumer, "invoked")) >= 2 * CONCURRENCY,
        20,
        what="the consumer under load",
    )
    assert (await run.stats()).in_flight > 0

    sent = time.monotonic()
    consumer.terminate()
    code = await consumer.exited(grace + 5)
    took = time.monotonic() - sent
    left_leased = (await run.stats()).in_flight

    (stopping,) = run.records_of(consumer, "stopping")
    late = [at for at in run.records_of(consumer, "invoked", "received") if at > stopping]
    unfinished = run.ids_of(consumer, "invoked") - run.ids_of(consumer, "acked")
    handed_back = run.ids_of(consumer, "nacked")

    run.consumer("c1", lease=LONG_LEASE, prefetch=PREFETCH, concurrency=CONCURRENCY)
    result = await run.drain()
    report(
        f"sigterm[grace={grace}]",
        result,
        exit_s=took,
        unfinished=len(unfinished),
        left_leased=left_leased,
    )
    assert code == 0, run.describe()
    assert took <= grace + 1.0, f"exit took {took:.3f} s"
    assert not late, "the consumer fetched or started work after SIGTERM"
    if grace > HANDLER_SLEEP:
        assert not unfinished, "a handler running at SIGTERM did not finish within grace"
    else:
        assert unfinished, "no handler was running at SIGTERM"
        assert unfinished <= handed_back, "a cancelled handler's message was not nacked"
    assert left_leased == 0, "deliveries stayed leased after exit instead of being handed back"
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    assert result.effected == result.acked, str(result)
    assert result.redeliveries <= PREFETCH, str(result)
