"""The saga state machine, as plain logic: history in, next move out (no I/O, no clock).

A saga instance's truth is its history, the ordered events the orchestrator
recorded before acting on each (Temporal's model). ``fold`` turns the events
into the state of each step; ``next_move`` says what the driver must do next:
run the pending steps of the first unfinished group, compensate one step, or
end the saga. The driver records the outcome and asks again, so a driver that
died anywhere resumes from the history alone.

The rules (RELIABILITY.md P7):

* Forward, groups run in order; a group is done when every step of it
  completed.
* A step that failed for good turns the saga to ``compensating``. Then every
  step that completed, or whose outcome is unknown (an attempt timed out, or
  the orchestrator died during it), is compensated, one at a time, in exact
  reverse declaration order. A step whose every attempt failed definitely (it
  raised) had no effect and is not compensated; a step without a compensation
  is skipped.
* A compensation that fails for good ends the saga ``compensation_failed``;
  the compensations before it in the order are not attempted (they may
  depend on it), until ``retry`` re-drives them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from wirework.saga.definition import Saga


class SagaStatus(StrEnum):
    """Where a saga instance is; the last three are terminal."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.COMPENSATION_FAILED})
ACTIVE = (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


class Kind(StrEnum):
    """The kinds of history events."""

    SAGA_STARTED = "saga_started"
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_COMPLETED = "compensation_completed"
    COMPENSATION_FAILED = "compensation_failed"
    SAGA_ENDED = "saga_ended"
    SAGA_RETRIED = "saga_retried"


@dataclass(frozen=True)
class Event:
    """One history event as the state machine needs it."""

    kind: str
    step: str | None = None
    attempt: int | None = None
    data: Mapping[str, Any] | None = None


@dataclass
class StepState:
    """What the history says about one step."""

    attempts: int = 0
    """Attempts of the action started so far (across restarts)."""
    in_flight: bool = False
    """An attempt started and no outcome was recorded: the driver died during it."""
    completed: bool = False
    output: Any = None
    """The output as stored JSON (None for no output)."""
    failed: bool = False
    """The action failed for good."""
    unknown: bool = False
    """Some attempt ended without a definite answer (a timeout, a restart)."""
    compensation_attempts: int = 0
    """Attempts of the compensation since the saga was last retried."""
    compensation_in_flight: bool = False
    compensated: bool = False
    compensation_failed: bool = False
    """The compensation failed for good (until a retry)."""

    @property
    def needs_compensation(self) -> bool:
        """Completed, or possibly took effect: P7's "completed or whose outcome is unknown"."""
        return self.completed or self.unknown or self.in_flight


def fold(events: Iterable[Event]) -> dict[str, StepState]:
    """The state of every step the history mentions, by name."""
    steps: dict[str, StepState] = {}
    for event in events:
        if event.kind == Kind.SAGA_RETRIED:
            for state in steps.values():
                state.compensation_failed = False
                state.compensation_attempts = 0
            continue
        if event.step is None:
            continue
        state = steps.setdefault(event.step, StepState())
        data = event.data or {}
        attempt = event.attempt or 0
        if event.kind == Kind.STEP_STARTED:
            state.attempts = max(state.attempts, attempt)
            state.in_flight = True
        elif event.kind == Kind.STEP_COMPLETED:
            state.in_flight = False
            state.completed = True
            state.output = data.get("output")
        elif event.kind == Kind.STEP_FAILED:
            state.in_flight = False
            state.unknown = state.unknown or bool(data.get("unknown"))
            state.failed = bool(data.get("final"))
        elif event.kind == Kind.COMPENSATION_STARTED:
            state.compensation_attempts = max(state.compensation_attempts, attempt)
            state.compensation_in_flight = True
        elif event.kind == Kind.COMPENSATION_COMPLETED:
            state.compensation_in_flight = False
            state.compensated = True
        elif event.kind == Kind.COMPENSATION_FAILED:
            state.compensation_in_flight = False
            state.compensation_failed = bool(data.get("final"))
    return steps


@dataclass(frozen=True)
class Move:
    """What the driver does next: run steps, compensate one, or end the saga."""

    kind: Literal["run", "compensate", "end"]
    steps: tuple[str, ...] = ()
    status: SagaStatus | None = None


def next_move(saga: Saga[Any], status: SagaStatus, steps: Mapping[str, StepState]) -> Move | None:
    """The next move for a saga in ``status`` with these step states; None once it ended."""
    if status.terminal:
        return None
    if status is SagaStatus.RUNNING:
        for group in saga.groups():
            pending = tuple(
                step.name for step in group if not steps.get(step.name, _NOTHING).completed
            )
            if pending:
                return Move("run", pending)
        return Move("end", status=SagaStatus.COMPLETED)
    for step in reversed(saga.steps):
        state = steps.get(step.name)
        if state is None or step.compensate is None or not state.needs_compensation:
            continue
        if state.compensated:
            continue
        if state.compensation_failed:
            return Move("end", status=SagaStatus.COMPENSATION_FAILED)
        return Move("compensate", (step.name,))
    return Move("end", status=SagaStatus.COMPENSATED)


def compensation_order(saga: Saga[Any], steps: Mapping[str, StepState]) -> list[str]:
    """The steps that are (or will be) compensated, in the order they are."""
    return [
        step.name
        for step in reversed(saga.steps)
        if step.compensate is not None
        and step.name in steps
        and steps[step.name].needs_compensation
    ]


_NOTHING = StepState()
