"""Pruning ended sagas: old completed and compensated ones go with their history; sagas in
flight and compensation_failed ones stay unless asked; on each store backend."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydantic import BaseModel

from tests.saga.test_saga import FAST, cli, running
from wirework.errors import ConfigurationError
from wirework.resilience import RetrySettings
from wirework.saga import (
    Orchestrator,
    PermanentError,
    Saga,
    SagaNotFoundError,
    SagaStatus,
    StepContext,
    journal,
)
from wirework.store import Store
from wirework.testing.conformance import wait_until

DAY = 86400.0


class Job(BaseModel):
    fail: bool = False
    undo_fails: bool = False


def build_saga() -> Saga[Job]:
    saga = Saga("job", Job)

    async def undo(ctx: StepContext[Job], output: None) -> None:
        if ctx.input.undo_fails:
            raise PermanentError("the undo is down")

    @saga.step("first", compensate=undo)
    async def first(ctx: StepContext[Job]) -> None:
        return None

    @saga.step("second", retry=RetrySettings(max_attempts=1))
    async def second(ctx: StepContext[Job]) -> None:
        if ctx.input.fail:
            raise PermanentError("no")

    return saga


async def age(store: Store, saga_id: str, days: float) -> None:
    """Move a saga's times ``days`` into the past, as if it had ended then."""
    async with store.transaction() as tx:
        await tx.execute(
            "UPDATE wirework_saga SET created_at = created_at - $1, updated_at = updated_at - $1,"
            " ended_at = ended_at - $1 WHERE saga_id = $2",
            days * DAY,
            saga_id,
        )


async def events(store: Store, saga_id: str) -> int:
    async with store.transaction() as tx:
        count = await tx.fetchval(
            "SELECT COUNT(*) FROM wirework_saga_event WHERE saga_id = $1", saga_id
        )
    return int(count)


async def world(store: Store) -> tuple[Orchestrator, dict[str, str]]:
    """Sagas of every kind, ended 10 days ago unless named ``recent`` or in flight."""
    orchestrator = Orchestrator(store, [build_saga()], **FAST)  # type: ignore[arg-type]
    ids = {
        "completed": await orchestrator.start("job", Job()),
        "compensated": await orchestrator.start("job", Job(fail=True)),
        "failed": await orchestrator.start("job", Job(fail=True, undo_fails=True)),
        "recent": await orchestrator.start("job", Job()),
    }
    async with running(orchestrator):
        for saga_id in ids.values():
            await orchestrator.result(saga_id, timeout=20)
    ids["running"] = await orchestrator.start("job", Job())  # nobody drives it
    for name, saga_id in ids.items():
        if name != "recent":
            await age(store, saga_id, 10)
    return orchestrator, ids


async def test_prune_deletes_old_ended_sagas_and_their_history_only(store: Store) -> None:
    """A dry run counts; the prune deletes the old completed and compensated sagas and their
    events; the recent one, the one in flight and the compensation_failed one stay, until
    include_failed takes the last."""
    orchestrator, ids = await world(store)
    history_of_completed = await events(store, ids["completed"])
    assert history_of_completed > 0
    dry = await orchestrator.prune(timedelta(days=7), dry_run=True)
    assert dry.dry_run
    assert dry.sagas == {SagaStatus.COMPLETED: 1, SagaStatus.COMPENSATED: 1}
    assert dry.events == history_of_completed + await events(store, ids["compensated"])
    await orchestrator.history(ids["completed"])  # a dry run deletes nothing

    pruned = await orchestrator.prune(timedelta(days=7))
    assert (pruned.sagas, pruned.events, pruned.dry_run) == (dry.sagas, dry.events, False)
    for name in ("completed", "compensated"):
        with pytest.raises(SagaNotFoundError):
            await orchestrator.history(ids[name])
        assert await events(store, ids[name]) == 0
    for name in ("failed", "recent", "running"):
        assert (await orchestrator.history(ids[name])).events, name
    assert (await orchestrator.prune(timedelta(days=7))).total == 0

    failed = await orchestrator.prune(timedelta(days=7), include_failed=True)
    assert failed.sagas == {SagaStatus.COMPENSATION_FAILED: 1}
    with pytest.raises(SagaNotFoundError):
        await orchestrator.history(ids["failed"])
    everything = await orchestrator.prune(timedelta(0), include_failed=True)
    assert everything.sagas == {SagaStatus.COMPLETED: 1}, "the recent one; never the running one"
    assert [r.saga_id for r in await orchestrator.list()] == [ids["running"]]


async def test_prune_works_in_batches_and_refuses_nonsense(store: Store) -> None:
    """Five old sagas pruned two per transaction, or at most three; negative ages refused."""
    orchestrator = Orchestrator(store, [build_saga()], **FAST)  # type: ignore[arg-type]
    started = [await orchestrator.start("job", Job()) for _ in range(5)]
    async with running(orchestrator):
        for saga_id in started:
            await orchestrator.result(saga_id, timeout=20)
    first = await journal.prune(store, older_than=timedelta(0), batch=2, limit=3)
    assert first.total == 3
    rest = await journal.prune(store, older_than=timedelta(0), batch=2)
    assert rest.total == 2
    assert await orchestrator.list() == []
    with pytest.raises(ConfigurationError):
        await orchestrator.prune(timedelta(days=-1))
    with pytest.raises(ConfigurationError):
        await journal.prune(store, older_than=timedelta(0), batch=0)
    with pytest.raises(ConfigurationError):
        Orchestrator(store, [build_saga()], retention=timedelta(days=-1), **FAST)  # type: ignore[arg-type]


async def test_an_orchestrator_with_retention_prunes_when_it_runs(store: Store) -> None:
    """retention=7 days: the orchestrator prunes the old completed saga as it starts running,
    and keeps the compensation_failed one."""
    _, ids = await world(store)
    orchestrator = Orchestrator(
        store,
        [build_saga()],
        retention=timedelta(days=7),
        **FAST,  # type: ignore[arg-type]
    )
    kept = {ids["failed"], ids["recent"], ids["running"]}

    async def pruned() -> bool:
        return {r.saga_id for r in await orchestrator.list()} == kept

    async with running(orchestrator):
        await orchestrator.result(ids["running"], timeout=20)
        await wait_until(pruned, what="the old sagas pruned")


async def test_the_cli_prunes_with_a_summary(store: Store, store_url: str) -> None:
    """`wirework saga prune --older-than 7d`: the dry run names what would go and what is
    kept for an operator; the real run deletes it; --include-failed takes the rest."""
    _, ids = await world(store)
    dry = await cli("saga", "prune", "--older-than", "7d", "--dry-run", "--store", store_url)
    assert "Would delete 2 sagas" in dry
    assert "Kept 1 compensation_failed saga" in dry
    assert "Dry run: nothing was deleted." in dry
    assert await events(store, ids["completed"]) > 0
    done = await cli("saga", "prune", "--older-than", "7d", "--json", "--store", store_url)
    summary = json.loads(done)
    assert summary["sagas"] == {"completed": 1, "compensated": 1}
    assert summary["kept_failed"] == 1
    assert await events(store, ids["completed"]) == 0
    rest = await cli(
        "saga", "prune", "--older-than", "1w", "--include-failed", "--store", store_url
    )
    assert "Deleted 1 saga" in rest
    listed = await cli("saga", "list", "--json", "--store", store_url)
    assert {row["saga_id"] for row in json.loads(listed)} == {ids["recent"], ids["running"]}


async def test_the_cli_shows_and_retries_a_failed_saga_and_publishes_the_retry(
    store: Store, store_url: str
) -> None:
    """`saga show ID` prints the timeline and the saga's correlation; `saga retry ID
    --publish` turns it back to compensating and writes saga.retried to the outbox."""
    orchestrator = Orchestrator(store, [build_saga()], **FAST)  # type: ignore[arg-type]
    saga_id = await orchestrator.start("job", Job(fail=True, undo_fails=True), correlation_id="c-1")
    async with running(orchestrator):
        await orchestrator.result(saga_id, timeout=20)
    shown = await cli("saga", "show", saga_id, "--store", store_url)
    assert "compensation_failed" in shown
    assert "the undo is down" in shown
    assert "c-1" in shown
    retried = await cli("saga", "retry", saga_id, "--publish", "--store", store_url)
    assert "is compensating again" in retried
    assert (await orchestrator.history(saga_id)).saga.status is SagaStatus.COMPENSATING
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT topic, headers FROM wirework_outbox")
    assert [(row["topic"], json.loads(row["headers"])["ce-type"]) for row in rows] == [
        (journal.TOPIC, "saga.retried")
    ]
