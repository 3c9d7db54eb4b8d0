"""Sagas driven by an orchestrator in this process, on each store backend.

The participant (``tests.helpers.saga_ledger``) writes effects under a unique
check on the idempotency key and logs every call outside that transaction,
so the effect rows are the oracle of what was applied.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from pydantic import BaseModel
from rich.console import Console

from tests.helpers.harness import REPO
from tests.helpers.saga_ledger import (
    STEPS,
    Done,
    LedgerOrder,
    Participant,
    build_saga,
    create_tables,
    effects,
    net,
    undo_order,
)
from wirework.brokers import connect
from wirework.brokers.base import Subscription
from wirework.cli.saga import timeline
from wirework.envelope import decode_wire
from wirework.resilience import RetrySettings
from wirework.saga import (
    Kind,
    Orchestrator,
    Saga,
    SagaChanged,
    SagaNotFoundError,
    SagaStateError,
    SagaStatus,
    StepContext,
)
from wirework.store import Store
from wirework.testing.conformance.support import subscribed, take

FAST = {"lease_timeout": 2.0, "poll_interval": 0.05}


@asynccontextmanager
async def running(orchestrator: Orchestrator) -> AsyncIterator[Orchestrator]:
    async with asyncio.TaskGroup() as group:
        group.create_task(orchestrator.run())
        try:
            yield orchestrator
        finally:
            await orchestrator.stop()


async def ledger_run(
    store: Store, order: LedgerOrder, *, participant: Participant | None = None
) -> tuple[str, Participant, Orchestrator]:
    participant = participant or Participant(store)
    orchestrator = Orchestrator(store, [build_saga(participant)], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start("ledger", order)
    async with running(orchestrator):
        await orchestrator.result(saga_id, timeout=20)
    return saga_id, participant, orchestrator


async def test_a_three_step_saga_completes_with_its_history(store: Store) -> None:
    """Steps a, b, c run in order once each; the saga ends completed; the history says so."""
    await create_tables(store)
    saga_id, participant, orchestrator = await ledger_run(store, LedgerOrder())
    history = await orchestrator.history(saga_id)
    assert history.saga.status is SagaStatus.COMPLETED
    assert history.saga.ended_at is not None
    assert history.saga.owner is None
    assert [(e.kind, e.step) for e in history.events] == [
        (Kind.SAGA_STARTED, None),
        *[(kind, step) for step in STEPS for kind in (Kind.STEP_STARTED, Kind.STEP_COMPLETED)],
        (Kind.SAGA_ENDED, None),
    ]
    completed = [e for e in history.events if e.kind is Kind.STEP_COMPLETED]
    assert completed[0].data["output"] == {"step": "a", "key": f"{saga_id}:a"}
    assert [call[1:3] for call in participant.calls] == [(step, "do") for step in STEPS]
    rows = await effects(store)
    assert [(row["step"], row["key"]) for row in rows] == [(s, f"{saga_id}:{s}") for s in STEPS]
    assert [r.saga_id for r in await orchestrator.list(status="completed")] == [saga_id]


async def test_a_permanently_failing_step_compensates_in_reverse_order(store: Store) -> None:
    """DEV-18: step c raises PermanentError; b then a are compensated once each; net 0."""
    await create_tables(store)
    saga_id, participant, orchestrator = await ledger_run(store, LedgerOrder(fail_at="c"))
    history = await orchestrator.history(saga_id)
    assert history.saga.status is SagaStatus.COMPENSATED
    assert "step 'c' failed" in (history.saga.error or "")
    rows = await effects(store)
    assert undo_order(rows, saga_id) == ["b", "a"]
    undo_seqs = [row["seq"] for row in rows if row["kind"] == "undo"]
    assert undo_seqs == sorted(undo_seqs)
    assert Counter((row["step"], row["kind"]) for row in rows) == {
        ("a", "do"): 1,
        ("b", "do"): 1,
        ("a", "undo"): 1,
        ("b", "undo"): 1,
    }
    assert net(rows, saga_id) == 0
    c_attempts = [call for call in participant.calls if call[1] == "c"]
    assert c_attempts == [(saga_id, "c", "do", 1)], "a PermanentError is never retried"
    compensated = [e.step for e in history.events if e.kind is Kind.COMPENSATION_COMPLETED]
    assert compensated == ["b", "a"]


async def test_a_compensation_that_fails_three_times_then_succeeds_ends_compensated(
    store: Store,
) -> None:
    """Each undo fails on attempts 1-3 and succeeds on the 4th, retried with backoff."""
    await create_tables(store)
    order = LedgerOrder(fail_at="c", compensation_failures=3)
    saga_id, participant, orchestrator = await ledger_run(store, order)
    history = await orchestrator.history(saga_id)
    assert history.saga.status is SagaStatus.COMPENSATED
    undo_calls = [call for call in participant.calls if call[2] == "undo"]
    assert [(step, attempt) for _, step, _, attempt in undo_calls] == [
        ("b", 1),
        ("b", 2),
        ("b", 3),
        ("b", 4),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("a", 4),
    ]
    failures = [e for e in history.events if e.kind is Kind.COMPENSATION_FAILED]
    assert len(failures) == 6
    assert not any(e.data["final"] for e in failures)
    assert net(await effects(store), saga_id) == 0


async def test_a_compensation_that_always_fails_ends_compensation_failed_and_is_listed(
    store: Store, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The undo of b never succeeds: the saga ends compensation_failed, logged at ERROR, listed
    by `wirework saga list --status compensation_failed`; a's undo is not attempted."""
    await create_tables(store)
    order = LedgerOrder(fail_at="c", undo_always_fails=True)
    with caplog.at_level("ERROR", logger="wirework.saga"):
        saga_id, participant, orchestrator = await ledger_run(store, order)
    history = await orchestrator.history(saga_id)
    assert history.saga.status is SagaStatus.COMPENSATION_FAILED
    assert "compensation of step 'b' failed" in (history.saga.error or "")
    assert {call[1] for call in participant.calls if call[2] == "undo"} == {"b"}
    assert any(
        saga_id in record.getMessage() and record.levelname == "ERROR" for record in caplog.records
    )
    listed = await cli("saga", "list", "--status", "compensation_failed", "--store", store_url)
    assert saga_id in listed
    out = Console(record=True, width=200)
    out.print(timeline(history))
    shown = out.export_text()
    assert "compensation_failed" in shown
    assert "undo of b is down" in shown
    assert [r.saga_id for r in await orchestrator.list(status="completed")] == []


async def test_a_compensation_failed_saga_is_retried_to_compensated(store: Store) -> None:
    """Once the cause is fixed, retry re-drives the compensations from the one that failed."""
    await create_tables(store)
    undo_down = True

    saga = Saga("retried", LedgerOrder)
    undone: list[str] = []

    async def undo(ctx: StepContext[LedgerOrder], output: Done | None) -> None:
        if undo_down and ctx.step == "b":
            raise RuntimeError("refunds are down")
        undone.append(ctx.step)

    def declare(step: str) -> None:
        @saga.step(
            step,
            compensate=undo,
            retry=RetrySettings(max_attempts=1),
            compensation_retry=RetrySettings(max_attempts=2, base_delay=0.01),
        )
        async def act(ctx: StepContext[LedgerOrder]) -> Done:
            if ctx.input.fail_at == step:
                raise RuntimeError(f"{step} fails")
            return Done(step=step, key=ctx.idempotency_key)

    for step in STEPS:
        declare(step)
    orchestrator = Orchestrator(store, [saga], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start(saga, LedgerOrder(fail_at="c"))
    async with running(orchestrator):
        first = await orchestrator.result(saga_id, timeout=20)
        assert first.status is SagaStatus.COMPENSATION_FAILED
        with pytest.raises(SagaStateError, match="only a compensation_failed"):
            await _retry_completed(store)
        undo_down = False
        await orchestrator.retry(saga_id)
        second = await orchestrator.result(saga_id, timeout=20)
    assert second.status is SagaStatus.COMPENSATED
    assert undone == ["b", "a"]
    kinds = [e.kind for e in (await orchestrator.history(saga_id)).events]
    assert kinds.count(Kind.SAGA_ENDED) == 2
    assert Kind.SAGA_RETRIED in kinds
    with pytest.raises(SagaNotFoundError):
        await orchestrator.history("no-such-saga")


async def _retry_completed(store: Store) -> None:
    """Retrying a completed saga is refused."""
    saga = Saga("once", LedgerOrder)

    @saga.step("only")
    async def only(ctx: StepContext[LedgerOrder]) -> None:
        return None

    orchestrator = Orchestrator(store, [saga], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start(saga, LedgerOrder())
    async with running(orchestrator):
        await orchestrator.result(saga_id, timeout=20)
    await orchestrator.retry(saga_id)


class Quote(BaseModel):
    source: str
    price: int


class Total(BaseModel):
    price: int


async def test_parallel_steps_fan_out_and_fan_in(store: Store) -> None:
    """Two steps of a parallel group run at once; the next step sees both outputs."""
    both_running = asyncio.Event()
    inside = 0
    saga = Saga("quotes", LedgerOrder)

    async def quote(source: str, ctx: StepContext[LedgerOrder]) -> Quote:
        nonlocal inside
        inside += 1
        if inside == 2:
            both_running.set()
        await asyncio.wait_for(both_running.wait(), 5)
        return Quote(source=source, price=len(source))

    with saga.parallel():

        @saga.step("north")
        async def north(ctx: StepContext[LedgerOrder]) -> Quote:
            return await quote("north", ctx)

        @saga.step("south")
        async def south(ctx: StepContext[LedgerOrder]) -> Quote:
            return await quote("southern", ctx)

    @saga.step("sum")
    async def total(ctx: StepContext[LedgerOrder]) -> Total:
        return Total(price=ctx.output(north).price + ctx.output(south).price)

    orchestrator = Orchestrator(store, [saga], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start(saga, {})
    async with running(orchestrator):
        record = await orchestrator.result(saga_id, timeout=20)
    assert record.status is SagaStatus.COMPLETED, record.error
    events = (await orchestrator.history(saga_id)).events
    order = [(e.kind, e.step) for e in events if e.step is not None]
    assert set(order[:2]) == {(Kind.STEP_STARTED, "north"), (Kind.STEP_STARTED, "south")}
    assert order[-1] == (Kind.STEP_COMPLETED, "sum")
    assert events[-2].data["output"] == {"price": 13}


async def test_a_step_reading_a_sibling_fails_and_a_timed_out_step_is_compensated(
    store: Store,
) -> None:
    """A step that times out has an unknown outcome: it is compensated with the others,
    in reverse order, and its compensation is told the outcome is unknown."""
    saga = Saga("slow", LedgerOrder)
    told: list[tuple[str, bool, bool]] = []

    async def undo(ctx: StepContext[LedgerOrder], output: Done | None) -> None:
        told.append((ctx.step, ctx.outcome_unknown, output is None))

    @saga.step("first", compensate=undo)
    async def first(ctx: StepContext[LedgerOrder]) -> Done:
        return Done(step="first", key=ctx.idempotency_key)

    @saga.step("hangs", compensate=undo, timeout=0.1, retry=RetrySettings(max_attempts=2))
    async def hangs(ctx: StepContext[LedgerOrder]) -> Done:
        await asyncio.Event().wait()  # never answers: only the step's timeout ends it
        return Done(step="hangs", key=ctx.idempotency_key)

    orchestrator = Orchestrator(store, [saga], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start(saga, LedgerOrder())
    async with running(orchestrator):
        record = await orchestrator.result(saga_id, timeout=20)
    assert record.status is SagaStatus.COMPENSATED
    assert told == [("hangs", True, True), ("first", False, False)]
    failed = [e for e in (await orchestrator.history(saga_id)).events if e.kind is Kind.STEP_FAILED]
    assert [(e.attempt, e.data["unknown"], e.data["final"]) for e in failed] == [
        (1, True, False),
        (2, True, True),
    ]


async def test_state_changes_are_published_through_the_outbox(store: Store) -> None:
    """With a broker, saga.started and saga.completed reach wirework.sagas (keyed by saga id)."""
    async with connect("memory://") as broker:
        participant = Participant(store)
        await create_tables(store)
        orchestrator = Orchestrator(store, [build_saga(participant)], broker=broker, **FAST)  # type: ignore[arg-type]
        subscription = Subscription(topic="wirework.sagas", group="audit")
        async with subscribed(broker, subscription) as deliveries:
            saga_id = await orchestrator.start("ledger", LedgerOrder(fail_at="b"))
            async with running(orchestrator):
                await orchestrator.result(saga_id, timeout=20)
                got = await take(deliveries, 3, ack=True, timeout=10)
    envelopes = [decode_wire(delivery.message) for delivery in got]
    assert [e.type for e in envelopes] == ["saga.started", "saga.compensating", "saga.compensated"]
    assert {e.key for e in envelopes} == {saga_id}
    assert envelopes[-1].extensions["sagaid"] == saga_id
    body = envelopes[1].decode(SagaChanged)
    assert body.status is SagaStatus.COMPENSATING
    assert body.step == "b"


async def test_start_is_idempotent_by_saga_id(store: Store) -> None:
    """Starting again with the same id records nothing new."""
    participant = Participant(store)
    orchestrator = Orchestrator(store, [build_saga(participant)], **FAST)  # type: ignore[arg-type]
    first = await orchestrator.start("ledger", LedgerOrder(), saga_id="order-1")
    again = await orchestrator.start("ledger", LedgerOrder(), saga_id="order-1")
    assert first == again == "order-1"
    history = await orchestrator.history("order-1")
    assert [e.kind for e in history.events] == [Kind.SAGA_STARTED]


async def cli(*args: str) -> str:
    """Run the real ``wirework`` command line in a process; its stdout (exit code 0 required)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wirework.cli.main",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()
