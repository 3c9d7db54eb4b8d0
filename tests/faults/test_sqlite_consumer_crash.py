"""Consumers that die: ``kill -9`` with a full prefetch, and named crash points, on SQLite."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.helpers.harness import LEASE, SEEDS, FaultRun, Supervisor, Worker, report
from wirework.faults import EXIT_CODE
from wirework.testing.conformance import wait_until

MESSAGES = 120
PREFETCH = 10


@pytest.mark.fault
@pytest.mark.parametrize("seed", SEEDS)
async def test_consumer_killed_with_full_prefetch_loses_nothing(run: FaultRun, seed: int) -> None:
    """A consumer killed -9 holding a full prefetch loses nothing: another process gets it all."""
    rng = random.Random(seed)
    handled_first = rng.randint(0, 40)
    publisher = run.publisher("p0", count=MESSAGES)
    assert await publisher.exited(30) == 0, run.describe()

    victim = run.consumer("a", prefetch=PREFETCH, concurrency=PREFETCH, block_after=handled_first)

    def holding_full_prefetch() -> bool:
        return (
            len(run.ids_of(victim, "acked")) == handled_first
            and len(run.records_of(victim, "invoked")) == handled_first + PREFETCH
        )

    await wait_until(holding_full_prefetch, 20, what="victim blocked on a full prefetch")
    assert (await run.stats()).in_flight == PREFETCH
    held = run.ids_of(victim, "invoked") - run.ids_of(victim, "acked")
    assert len(held) == PREFETCH

    victim.kill()
    assert await victim.exited(5) == -9
    killed_at = time.monotonic()
    survivor = run.consumer("b", prefetch=PREFETCH, concurrency=4)
    result = await run.drain()

    back = [r.at for r in run.history().of("invoked", process=f"b.{survivor.pid}") if r.id in held]
    report(
        f"kill-consumer[seed={seed}]",
        result,
        held=len(held),
        last_held_back_after_kill_s=max(back, default=float("nan")) - killed_at,
    )
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    assert result.effected == result.acked == result.attempted, str(result)
    assert all(result.invocations[one] >= 2 for one in held), "held ids not redelivered"
    assert result.redeliveries >= len(held), str(result)
    assert len(back) == len(held), "the survivor did not handle every held id"


CRASH_CASES = [
    *(pytest.param("consume.after_handler", seed, id=f"after_handler-{seed}") for seed in SEEDS),
    pytest.param("consume.after_commit_before_ack", 1, id="after_commit_before_ack-1"),
    *(pytest.param("consume.after_receive", seed, id=f"after_receive-{seed}") for seed in SEEDS),
]

#: A restarted consumer needs a moment before it invokes again; not a sign of a finished drain.
RESTART_ALLOWANCE = 3.0


@pytest.mark.fault
@pytest.mark.parametrize(("point", "seed"), CRASH_CASES)
async def test_consumers_crashing_at_a_point_lose_nothing_across_restarts(
    run: FaultRun, point: str, seed: int
) -> None:
    """Two consumers crashing at ``point`` every few messages, restarted, lose nothing."""
    rng = random.Random(seed)
    publisher = run.publisher("p0", count=150)
    assert await publisher.exited(30) == 0, run.describe()

    def start(name: str) -> Worker:
        every = rng.randint(8, 25)
        return run.consumer(name, prefetch=PREFETCH, fault_point=point, fault_every=every)

    supervisor = Supervisor(start, ("c0", "c1"))
    supervising = asyncio.create_task(supervisor.run())
    try:
        result = await run.drain(quiet=2 * LEASE + RESTART_ALLOWANCE)
    finally:
        supervisor.stop()
        await supervising

    crashed = [worker for worker, code in supervisor.exits if code == EXIT_CODE]
    others = [(worker.name, code) for worker, code in supervisor.exits if code != EXIT_CODE]
    history = run.history()
    handled_twice = sum(1 for count in history.counts("handled").values() if count > 1)
    report(f"crash[{point},seed={seed}]", result, crashes=len(crashed), handled_twice=handled_twice)
    # With concurrency 1 each crash strands the message it was working on and, after
    # the handler, the acks of earlier ones still on their way (the Consumer takes the
    # next message without waiting for an ack; never more than the prefetch).
    began, ended = (
        ("received", "invoked") if point == "consume.after_receive" else ("handled", "acked")
    )
    stranded: list[str] = []
    for worker in crashed:
        process = f"{worker.name}.{worker.pid}"
        left = history.ids(began, process=process) - history.ids(ended, process=process)
        last = history.of(began, process=process)[-1].id
        assert last in left, f"{worker.name} pid {worker.pid}: {last} was not stranded"
        most = 1 if point == "consume.after_receive" else PREFETCH
        assert len(left) <= most, f"{worker.name} pid {worker.pid} stranded {sorted(left)}"
        stranded.extend(left)
    received = history.counts("received")

    assert not others, f"workers exited for another reason: {others}\n{run.describe()}"
    assert len(crashed) >= 2, f"expected several crashes\n{run.describe()}"
    assert not result.lost, f"{result}\n{run.describe()}"
    assert not result.unexpected, str(result)
    # An ack begun but not answered when its process died either held or its message
    # came back: ``ack_unknown`` holds the ones that never came back.
    settled = result.effected | result.ack_unknown
    assert settled == result.acked == result.attempted, str(result)
    assert set(stranded) <= settled
    if point == "consume.after_receive":
        assert all(received[one] >= 2 for one in stranded), "a stranded id was not redelivered"
    else:
        back = [one for one in stranded if one not in result.ack_unknown]
        assert all(result.invocations[one] >= 2 for one in back), "no second invocation"
        assert result.redeliveries >= len(crashed), str(result)
