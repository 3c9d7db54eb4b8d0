"""Declaring sagas, and the state machine as plain logic (no store, no event loop)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from wirework.errors import ConfigurationError
from wirework.saga import (
    Orchestrator,
    PermanentError,
    Saga,
    SagaDefinitionError,
    StepContext,
    idempotency_key,
    is_retryable,
)
from wirework.saga.state import Event, Kind, Move, SagaStatus, fold, next_move
from wirework.store import connect_store


class Order(BaseModel):
    order_id: str


class Reservation(BaseModel):
    reservation_id: str


def three_steps() -> Saga[Order]:
    saga = Saga("fulfilment", Order)

    async def release(ctx: StepContext[Order], output: Reservation | None) -> None:
        return None

    @saga.step("reserve", compensate=release)
    async def reserve(ctx: StepContext[Order]) -> Reservation:
        return Reservation(reservation_id="r")

    with saga.parallel():

        @saga.step("charge", compensate=release, output=Reservation)
        async def charge(ctx: StepContext[Order]) -> Reservation:
            return Reservation(reservation_id="c")

        @saga.step("label")
        async def label(ctx: StepContext[Order]) -> None:
            return None

    @saga.step("notify")
    async def notify(ctx: StepContext[Order]) -> None:
        return None

    return saga


def test_steps_and_groups_are_in_declaration_order() -> None:
    saga = three_steps()
    assert [step.name for step in saga.steps] == ["reserve", "charge", "label", "notify"]
    assert [[step.name for step in group] for group in saga.groups()] == [
        ["reserve"],
        ["charge", "label"],
        ["notify"],
    ]
    assert saga.get("reserve").output_model is Reservation
    assert saga.get("label").output_model is None
    assert idempotency_key("s-1", "reserve") == "s-1:reserve"
    assert idempotency_key("s-1", "reserve", compensation=True) == "s-1:reserve:compensate"


def test_declaration_errors_say_what_to_write() -> None:
    """Bad names, duplicates, sync functions, missing or non-model outputs, bad timeouts,
    nested or empty parallel groups, an input that is not a model: all refused at once."""
    with pytest.raises(SagaDefinitionError, match="invalid saga name"):
        Saga("has space", Order)
    with pytest.raises(SagaDefinitionError, match="pydantic model class"):
        Saga("s", dict)  # type: ignore[type-var]
    saga = Saga("s", Order)

    @saga.step("one")
    async def one(ctx: StepContext[Order]) -> None:
        return None

    with pytest.raises(SagaDefinitionError, match="already has a step named 'one'"):
        saga.step("one")
    with pytest.raises(SagaDefinitionError, match="invalid step name"):
        saga.step("a:b")
    with pytest.raises(SagaDefinitionError, match="timeout must be a positive"):
        saga.step("t", timeout=0)
    with pytest.raises(SagaDefinitionError, match="async function"):

        @saga.step("sync")  # type: ignore[arg-type]  # refused by mypy too
        def sync(ctx: StepContext[Order]) -> None:
            return None

    with pytest.raises(SagaDefinitionError, match="no return annotation"):

        @saga.step("bare")
        async def bare(ctx):  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(SagaDefinitionError, match="must be a pydantic model"):

        @saga.step("dict")
        async def returns_dict(ctx: StepContext[Order]) -> dict[str, int]:
            return {}

    with pytest.raises(SagaDefinitionError, match="do not nest"), saga.parallel(), saga.parallel():
        pass
    with pytest.raises(SagaDefinitionError, match="declares no step"), saga.parallel():
        pass
    assert isinstance(SagaDefinitionError("x"), ConfigurationError)


async def test_an_orchestrator_refuses_empty_and_duplicate_sagas(tmp_path: object) -> None:
    store = connect_store(f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(SagaDefinitionError, match="has no steps"):
        Orchestrator(store, [Saga("empty", Order)])
    with pytest.raises(SagaDefinitionError, match="two sagas are named 'fulfilment'"):
        Orchestrator(store, [three_steps(), three_steps()])
    saga = three_steps()
    Orchestrator(store, [saga])
    with pytest.raises(SagaDefinitionError, match="before creating the Orchestrator"):
        saga.step("late")
    with pytest.raises(SagaDefinitionError, match="drives no saga 'other'"):
        await Orchestrator(store, [three_steps()]).start("other", {"order_id": "o"})
    with pytest.raises(ConfigurationError, match="does not fit Order"):
        await Orchestrator(store, [three_steps()]).start("fulfilment", {"wrong": 1})
    await store.aclose()


def test_retryable_errors_follow_the_failure_classes() -> None:
    assert not is_retryable(PermanentError("declined"))
    assert not is_retryable(ConfigurationError("bad"))
    assert is_retryable(TimeoutError())
    assert is_retryable(RuntimeError("flaky"))


def started(step: str, attempt: int = 1) -> Event:
    return Event(Kind.STEP_STARTED, step, attempt)


def completed(step: str) -> Event:
    return Event(Kind.STEP_COMPLETED, step, 1, {"output": None})


def test_forward_moves_run_each_group_then_end_completed() -> None:
    saga = three_steps()
    assert next_move(saga, SagaStatus.RUNNING, fold([])) == Move("run", ("reserve",))
    history = [started("reserve"), completed("reserve")]
    assert next_move(saga, SagaStatus.RUNNING, fold(history)) == Move("run", ("charge", "label"))
    history += [started("charge"), started("label"), completed("label")]
    assert next_move(saga, SagaStatus.RUNNING, fold(history)) == Move("run", ("charge",))
    history += [completed("charge"), started("notify"), completed("notify")]
    move = next_move(saga, SagaStatus.RUNNING, fold(history))
    assert move == Move("end", status=SagaStatus.COMPLETED)
    assert next_move(saga, SagaStatus.COMPLETED, fold(history)) is None


def test_compensation_covers_completed_and_unknown_steps_in_reverse_order() -> None:
    """P7: reserve completed, charge's outcome is unknown (started, never finished), label
    failed definitely: charge is compensated first, then reserve; label never."""
    saga = three_steps()
    history = [
        started("reserve"),
        completed("reserve"),
        started("charge"),
        started("label"),
        Event(Kind.STEP_FAILED, "label", 1, {"final": True, "unknown": False}),
    ]
    steps = fold(history)
    assert steps["charge"].needs_compensation
    assert not steps["label"].needs_compensation
    status = SagaStatus.COMPENSATING
    assert next_move(saga, status, steps) == Move("compensate", ("charge",))
    history += [
        Event(Kind.COMPENSATION_STARTED, "charge", 1),
        Event(Kind.COMPENSATION_COMPLETED, "charge", 1),
    ]
    assert next_move(saga, status, fold(history)) == Move("compensate", ("reserve",))
    failed = [
        *history,
        Event(Kind.COMPENSATION_STARTED, "reserve", 1),
        Event(Kind.COMPENSATION_FAILED, "reserve", 1, {"final": True}),
    ]
    assert next_move(saga, status, fold(failed)) == Move(
        "end", status=SagaStatus.COMPENSATION_FAILED
    )
    retried = [*failed, Event(Kind.SAGA_RETRIED)]
    steps = fold(retried)
    assert steps["reserve"].compensation_attempts == 0
    assert next_move(saga, status, steps) == Move("compensate", ("reserve",))
    done = [
        *retried,
        Event(Kind.COMPENSATION_STARTED, "reserve", 1),
        Event(Kind.COMPENSATION_COMPLETED, "reserve", 1),
    ]
    assert next_move(saga, status, fold(done)) == Move("end", status=SagaStatus.COMPENSATED)
