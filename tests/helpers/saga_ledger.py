"""The saga tests' workload: a 3-step saga whose participant keeps a ledger of effects.

The participant applies each step's effect (+1) and each compensation's
(-1) in a store transaction, under a unique check on the idempotency key
(``saga_processed``), into ``saga_effects``, which has **no** unique
constraint: a key that changed between attempts, or a check that failed,
would show as a second effect row for one (saga, step, kind). Each call is
also logged *outside* the transaction (``invoked`` in the ledger file, or a
list in memory), so repeats are counted (RELIABILITY.md §2.0).

A compensation undoes only an effect that exists (a step whose outcome was
unknown may never have applied one), so a compensated saga nets to 0.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from wirework.resilience import RetrySettings
from wirework.saga import PermanentError, Saga, StepContext
from wirework.saga.failures import settled
from wirework.store import Row, Store
from wirework.testing.ledger import LedgerFile

STEPS = ("a", "b", "c")

#: Retries fast enough for tests; many attempts so a crash-interrupted attempt never
#: exhausts a step that is meant to complete.
STEP_RETRY = RetrySettings(max_attempts=10, base_delay=0.01, max_delay=0.05)
COMPENSATION_RETRY = RetrySettings(max_attempts=6, base_delay=0.01, max_delay=0.05)


class LedgerOrder(BaseModel):
    """The saga input: how this instance should behave."""

    fail_at: str | None = None
    """The step that raises PermanentError (no effect), making the saga compensate."""
    compensation_failures: int = 0
    """Attempts of each compensation that fail before one succeeds."""
    undo_always_fails: bool = False
    work: float = 0.0
    """Seconds each action spends before its effect."""


class Done(BaseModel):
    step: str
    key: str


def tables(dialect: str) -> list[str]:
    seq = (
        "seq INTEGER PRIMARY KEY AUTOINCREMENT"
        if dialect == "sqlite"
        else "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    )
    return [
        "CREATE TABLE saga_processed (key TEXT PRIMARY KEY)",
        f"CREATE TABLE saga_effects ({seq}, saga_id TEXT NOT NULL, step TEXT NOT NULL,"
        " kind TEXT NOT NULL, key TEXT NOT NULL, process TEXT NOT NULL, amount INTEGER NOT NULL)",
    ]


async def create_tables(store: Store) -> None:
    async with store.transaction() as tx:
        for statement in tables(tx.dialect):
            await tx.execute(statement)


async def effects(store: Store) -> list[Row]:
    """Every effect row, in the order they were written."""
    async with store.transaction() as tx:
        return await tx.fetch(
            "SELECT seq, saga_id, step, kind, key, process, amount FROM saga_effects ORDER BY seq"
        )


@dataclass
class Participant:
    """The remote side of every step, and the log of its calls."""

    store: Store
    ledger: LedgerFile | None = None
    calls: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(saga id, step, "do" or "undo", attempt) of every call, in order (in memory)."""
    process: str = field(default_factory=lambda: str(os.getpid()))

    def log(self, kind: str, ctx: StepContext[LedgerOrder], **fields: object) -> None:
        what = "undo" if ctx.compensating else "do"
        if kind == "invoked":
            self.calls.append((ctx.saga_id, ctx.step, what, ctx.attempt))
        if self.ledger is not None:
            one = f"{ctx.saga_id}/{ctx.step}/{what}"
            self.ledger.record(kind, one, attempt=ctx.attempt, **fields)

    async def apply(self, ctx: StepContext[LedgerOrder], amount: int) -> None:
        """Apply the effect once per idempotency key (an undo only of an applied effect).

        Shielded: a step cancelled at its timeout must not cut the store
        transaction in the middle (see the report on ``SqliteStore.transaction``).
        """
        await settled(self._apply(ctx, amount))

    async def _apply(self, ctx: StepContext[LedgerOrder], amount: int) -> None:
        kind = "undo" if ctx.compensating else "do"
        async with self.store.transaction() as tx:
            if ctx.compensating:
                done = await tx.fetchval(
                    "SELECT count(*) FROM saga_processed WHERE key = $1",
                    ctx.idempotency_key.removesuffix(":compensate"),
                )
            claimed = await tx.execute(
                "INSERT INTO saga_processed (key) VALUES ($1) ON CONFLICT (key) DO NOTHING",
                ctx.idempotency_key,
            )
            if claimed and (not ctx.compensating or int(done)):
                await tx.execute(
                    "INSERT INTO saga_effects (saga_id, step, kind, key, process, amount)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    ctx.saga_id,
                    ctx.step,
                    kind,
                    ctx.idempotency_key,
                    self.process,
                    amount,
                )


def build_saga(
    participant: Participant, *, name: str = "ledger", timeout: float = 5.0
) -> Saga[LedgerOrder]:
    """The 3-step saga over ``participant``: steps a, b, c, each with a compensation."""
    saga = Saga(name, LedgerOrder)

    def declare(step: str) -> None:
        async def undo(ctx: StepContext[LedgerOrder], output: Done | None) -> None:
            participant.log("invoked", ctx)
            order = ctx.input
            if order.undo_always_fails or ctx.attempt <= order.compensation_failures:
                raise RuntimeError(f"the undo of {step} is down (attempt {ctx.attempt})")
            await participant.apply(ctx, -1)
            participant.log("handled", ctx)

        @saga.step(
            step,
            compensate=undo,
            timeout=timeout,
            retry=STEP_RETRY,
            compensation_retry=COMPENSATION_RETRY,
        )
        async def act(ctx: StepContext[LedgerOrder]) -> Done:
            participant.log("invoked", ctx)
            participant.log("enter", ctx)
            try:
                if ctx.input.work:
                    await asyncio.sleep(ctx.input.work)
                if ctx.input.fail_at == step:
                    raise PermanentError(f"step {step} is declined for good")
                await participant.apply(ctx, +1)
            finally:
                participant.log("leave", ctx)
            participant.log("handled", ctx)
            return Done(step=step, key=ctx.idempotency_key)

    for step in STEPS:
        declare(step)
    return saga


def undo_order(rows: Sequence[Row], saga_id: str) -> list[str]:
    """The steps whose undo effect was written for one saga, in the order written."""
    return [row["step"] for row in rows if row["saga_id"] == saga_id and row["kind"] == "undo"]


def net(rows: Sequence[Row], saga_id: str) -> int:
    return sum(int(row["amount"]) for row in rows if row["saga_id"] == saga_id)
