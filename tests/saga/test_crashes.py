"""DEV-17 and the lease: orchestrator processes killed at every transition, and run side by side.

The participant writes each effect under a unique check on the step's
idempotency key into a table without one, and logs each call outside the
transaction (``tests.helpers.saga_ledger``): the effect rows say what was
applied, the ledger how often it was asked.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.harness import Worker
from tests.helpers.saga_ledger import STEPS, LedgerOrder, Participant, build_saga, create_tables
from tests.helpers.saga_ledger import effects as effect_rows
from tests.saga.runs import SagaRun, Terminal, overlaps, statuses
from wirework.faults import EXIT_CODE
from wirework.saga import Kind, Orchestrator
from wirework.store import connect_store
from wirework.testing.conformance import wait_until

#: A crash point after every kind of recorded transition, plus the two between an
#: effect and its record (the saga_started point fires in the starter, not a worker).
POINTS = (
    "saga.after_step_started",
    "saga.after_step_completed",
    "saga.after_step_failed",
    "saga.after_compensation_started",
    "saga.after_compensation_completed",
    "saga.after_compensation_failed",
    "saga.after_saga_ended",
    "saga.after_step_record",
    "saga.after_step_effect",
    "saga.during_compensation",
)
SAGAS = 200


def order(n: int) -> LedgerOrder:
    """Half complete; a quarter fail at c with each undo failing once; a quarter fail at b."""
    kind = n % 4
    if kind == 0:
        return LedgerOrder(fail_at="c", compensation_failures=1, work=0.002)
    if kind == 1:
        return LedgerOrder(fail_at="b", work=0.002)
    return LedgerOrder(work=0.002)


def expected_undo(order: LedgerOrder) -> list[str]:
    if order.fail_at is None:
        return []
    return list(reversed(STEPS[: STEPS.index(order.fail_at)]))


@pytest.mark.fault
@pytest.mark.slow
async def test_orchestrators_killed_at_every_transition_finish_every_saga_once(
    tmp_path: Path,
) -> None:
    """DEV-17: 200 sagas, two orchestrator processes killed at each transition kind in turn
    (each restart arms the next crash point): every saga ends as its input says, each effect
    is applied once, and compensations run in exact reverse order."""
    seed = 17
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path}/store.db"
    run = SagaRun(tmp_path, store_url)
    armed = list(POINTS)
    rng.shuffle(armed)
    orders = {f"s{n}": order(n) for n in range(SAGAS)}
    fired: Counter[str] = Counter()
    try:
        async with connect_store(store_url) as store:
            await create_tables(store)
            starter = Orchestrator(store, [build_saga(Participant(store))])
            for saga_id, wanted in orders.items():
                await starter.start("ledger", wanted, saga_id=saga_id)

            def start(name: str) -> tuple[Worker, str | None]:
                # Each start takes the next crash point until every one has fired once.
                point = armed.pop() if armed else None
                return run.start(name, point=point, every=rng.randint(2, 6), max_sagas=10), point

            workers = {name: start(name) for name in ("o0", "o1")}
            ended = Terminal(store, set(orders))

            async def finished() -> bool:
                for name, (worker, point) in list(workers.items()):
                    if worker.alive:
                        continue
                    assert point is not None, f"{name} exited unarmed\n{run.describe()}"
                    assert worker.returncode == EXIT_CODE, run.describe()
                    fired[point] += 1
                    workers[name] = start(name)
                return await ended()

            await wait_until(finished, 75, what=f"every saga to end\n{run.describe()}")
            for worker, _ in workers.values():
                worker.terminate()
            for worker, _ in workers.values():
                assert await worker.exited(20) in (0, EXIT_CODE), run.describe()
            found = await statuses(store)
            rows = await effect_rows(store)
            histories = {saga_id: await starter.history(saga_id) for saga_id in orders}
    finally:
        run.kill_all()

    counts = Counter((row["saga_id"], row["step"], row["kind"]) for row in rows)
    duplicates = {key: count for key, count in counts.items() if count > 1}
    ledger = run.history()
    invocations = ledger.counts("invoked")
    print(
        f"SAGA-LEDGER dev-17: sagas={len(orders)} crashes={sum(fired.values())} "
        f"calls={sum(invocations.values())} distinct={len(invocations)} "
        f"resent={sum(invocations.values()) - len(invocations)} effects={len(rows)} "
        f"dup_effects={len(duplicates)}"
    )
    assert set(fired) == set(POINTS), f"points that never fired: {set(POINTS) - set(fired)}"
    assert not duplicates, f"effects applied twice: {duplicates}"
    for saga_id, wanted in orders.items():
        status = "completed" if wanted.fail_at is None else "compensated"
        assert found[saga_id] == status, f"{saga_id}: {found[saga_id]}\n{histories[saga_id]}"
        mine = [row for row in rows if row["saga_id"] == saga_id]
        done = [row["step"] for row in mine if row["kind"] == "do"]
        undone = [row["step"] for row in mine if row["kind"] == "undo"]
        if wanted.fail_at is None:
            assert done == list(STEPS), saga_id
            assert not undone, saga_id
            continue
        assert undone == expected_undo(wanted), f"{saga_id}: undo order {undone}"
        assert sum(int(row["amount"]) for row in mine) == 0, saga_id
        compensated = [
            e.step for e in histories[saga_id].events if e.kind is Kind.COMPENSATION_COMPLETED
        ]
        positions = [STEPS.index(step) for step in compensated if step is not None]
        assert positions == sorted(positions, reverse=True), f"{saga_id}: {compensated}"
        assert len(set(compensated)) == len(compensated), f"{saga_id}: {compensated}"


@pytest.mark.fault
async def test_two_orchestrators_never_drive_one_saga_at_once(
    store_url: str, tmp_path: Path
) -> None:
    """Two orchestrator processes share 40 sagas: each saga's step calls come from one
    process at a time (ledger enter/leave intervals never overlap across processes)."""
    run = SagaRun(tmp_path, store_url)
    try:
        async with connect_store(store_url) as store:
            await create_tables(store)
            starter = Orchestrator(store, [build_saga(Participant(store))])
            # At most 5 sagas each, so that neither can take all of them at once.
            first, second = (run.start(name, max_sagas=5) for name in ("o0", "o1"))
            await wait_until(
                lambda: len(run.history().of("started")) == 2,
                30,
                what=f"both orchestrators to run\n{run.describe()}",
            )
            ids = {
                await starter.start(
                    "ledger", LedgerOrder(work=0.03, fail_at=None if n % 3 else "c")
                )
                for n in range(40)
            }
            ended = Terminal(store, ids)

            async def finished() -> bool:
                assert first.alive, run.describe()
                assert second.alive, run.describe()
                return await ended()

            await wait_until(finished, 60, what=f"the sagas to end\n{run.describe()}")
            rows = await effect_rows(store)
            for worker in (first, second):
                worker.terminate()
            for worker in (first, second):
                assert await worker.exited(20) == 0, run.describe()
    finally:
        run.kill_all()
    ledger = run.history()
    drivers = {record.process.split(".")[0] for record in ledger.of("enter")}
    assert drivers == {"o0", "o1"}, "both orchestrators drove sagas"
    assert overlaps(ledger) == []
    counts = Counter((row["saga_id"], row["step"], row["kind"]) for row in rows)
    assert max(counts.values()) == 1


@pytest.mark.fault
@pytest.mark.parametrize("step", [1, 2, 3])
async def test_dev17_a_crash_after_a_step_record_resumes_to_completed(
    tmp_path: Path, step: int
) -> None:
    """DEV-17: the orchestrator dies at saga.after_step_record right after step ``step``'s
    completion is recorded; restarted, the saga ends completed with one effect per step."""
    store_url = f"sqlite:///{tmp_path}/store.db"
    run = SagaRun(tmp_path, store_url)
    try:
        async with connect_store(store_url) as store:
            await create_tables(store)
            starter = Orchestrator(store, [build_saga(Participant(store))])
            # Each step writes two step records (started, completed): the 2n-th is step n's end.
            armed = run.start("o", point="saga.after_step_record", every=2 * step)
            saga_id = await starter.start("ledger", LedgerOrder())
            assert await armed.exited(30) == EXIT_CODE, run.describe()
            resumed = run.start("o")
            record = await starter.result(saga_id, timeout=30)
            resumed.terminate()
            assert await resumed.exited(20) == 0, run.describe()
            rows = await effect_rows(store)
            history = await starter.history(saga_id)
    finally:
        run.kill_all()
    assert record.status == "completed", history
    assert Counter(row["step"] for row in rows) == dict.fromkeys(STEPS, 1)
    invocations = run.history().counts("invoked")
    resent = sum(invocations.values()) - len(invocations)
    completed = [e.step for e in history.events if e.kind is Kind.STEP_COMPLETED]
    assert completed == list(STEPS)
    print(f"SAGA-LEDGER dev-17[after step {step}]: completed, effects=1 per step, resent={resent}")
