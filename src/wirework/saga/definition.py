"""Declaring a saga: a name, a typed input, and ordered steps with their compensations.

A step is an async function of a ``StepContext``; it returns a pydantic model
(stored as JSON, so a later step sees it even after the orchestrator
restarted) or None. Its compensation is an async function of the same
context and that output (None when the step's outcome is unknown). Steps
declared inside ``with saga.parallel():`` form one group: they run together
(fan-out) and the next step starts when all of them completed (fan-in)::

    saga = Saga("fulfilment", FulfilOrder)

    @saga.step("reserve", compensate=release, timeout=2)
    async def reserve(ctx: StepContext[FulfilOrder]) -> Reservation: ...

    with saga.parallel():
        @saga.step("charge", compensate=refund)
        async def charge(ctx: StepContext[FulfilOrder]) -> Receipt:
            reservation = ctx.output(reserve)  # a Reservation, typed
            ...

        @saga.step("label")
        async def label(ctx: StepContext[FulfilOrder]) -> None: ...

Every action and compensation gets ``ctx.idempotency_key`` (saga id + step
name, + ``:compensate`` for the compensation), the same on every attempt and
after a restart, so the participant can tell a repeat (RELIABILITY.md P7).
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

from pydantic import BaseModel

from wirework.resilience.settings import RetrySettings
from wirework.saga.errors import SagaDefinitionError

In = TypeVar("In", bound=BaseModel)  # the saga's input model
Out = TypeVar("Out")  # a step's output: a pydantic model, or None

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")

#: Attempts of a step's action unless its ``retry=`` says otherwise.
DEFAULT_RETRY = RetrySettings(max_attempts=3, base_delay=0.1, max_delay=5.0)
#: Attempts of a compensation: more, since a compensation that gives up needs a person.
DEFAULT_COMPENSATION_RETRY = RetrySettings(max_attempts=8, base_delay=0.1, max_delay=5.0)
#: Seconds one attempt of an action or compensation may take unless ``timeout=`` is given.
DEFAULT_TIMEOUT = 30.0

COMPENSATE_SUFFIX = ":compensate"


def idempotency_key(saga_id: str, step: str, *, compensation: bool = False) -> str:
    """The stable key of one step's action (or compensation) in one saga."""
    return f"{saga_id}:{step}{COMPENSATE_SUFFIX if compensation else ''}"


@dataclass(frozen=True)
class StepContext(Generic[In]):
    """What an action or compensation is told: who it is, which attempt, and the data.

    Attributes:
        saga_id: the saga instance.
        saga: the saga's name.
        step: the step's name.
        idempotency_key: ``<saga id>:<step>`` (``...:compensate`` for the
            compensation): pass it to the participant so a repeat is absorbed.
        attempt: 1 for the first attempt; counts across orchestrator restarts.
        input: the saga's input.
        compensating: True in a compensation.
        outcome_unknown: in a compensation, True if the action may or may not
            have taken effect (it timed out, or the orchestrator died during it).
    """

    saga_id: str
    saga: str
    step: str
    idempotency_key: str
    attempt: int
    input: In
    compensating: bool = False
    outcome_unknown: bool = False
    outputs: typing.Mapping[str, BaseModel | None] = field(default_factory=dict)
    """Outputs of the steps this one may read (those of earlier groups), by step name."""

    def output(self, step: Step[Any, Out]) -> Out:
        """The output of an earlier step, as its model.

        Raises:
            SagaDefinitionError: ``step`` runs in the same parallel group as this
                one or later, so its output cannot be known here.
        """
        if step.name not in self.outputs:
            raise SagaDefinitionError(
                f"step {self.step!r} of saga {self.saga!r} reads the output of step "
                f"{step.name!r}, which does not run before it; read only steps of earlier "
                f"groups (a parallel group's steps cannot see each other)"
            )
        return typing.cast(Out, self.outputs[step.name])


Action = Callable[[StepContext[In]], Awaitable[Out]]
Compensation = Callable[[StepContext[In], Out | None], Awaitable[None]]


@dataclass(frozen=True, eq=False)
class Step(Generic[In, Out]):
    """One declared step; ``saga.step(...)`` makes it. Pass it to ``ctx.output``."""

    name: str
    position: int
    group: int
    """Index of the group it runs in; steps of one parallel group share it."""
    action: Action[In, Out]
    compensate: Compensation[In, Out] | None
    output_model: type[BaseModel] | None
    timeout: float
    retry: RetrySettings
    compensation_retry: RetrySettings

    def load_output(self, data: Any) -> BaseModel | None:
        """The stored JSON of an output, as the step's model."""
        if self.output_model is None or data is None:
            return None
        return self.output_model.model_validate(data)


class _Declare(Protocol[In]):
    """The decorator ``saga.step(name)`` returns when no compensation ties the output type."""

    def __call__(self, action: Action[In, Out], /) -> Step[In, Out]: ...


class Saga(Generic[In]):
    """A saga type: its name, its input model and its steps, in order.

    Args:
        name: unique among the sagas of an orchestrator; stored with each instance.
        input: the pydantic model of the saga's input.

    Raises:
        SagaDefinitionError: an invalid name, or an input that is not a model.
    """

    def __init__(self, name: str, input: type[In]) -> None:
        _check_name("saga", name)
        if not (isinstance(input, type) and issubclass(input, BaseModel)):
            raise SagaDefinitionError(
                f"saga {name!r}: the input must be a pydantic model class, got {input!r}"
            )
        self.name = name
        self.input = input
        self._steps: list[Step[In, Any]] = []
        self._groups = 0
        self._parallel: int | None = None
        self._parallel_size = 0
        self._frozen = False

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, steps={[step.name for step in self._steps]})"

    @property
    def steps(self) -> list[Step[In, Any]]:
        """The steps in declaration order (the reverse of compensation order)."""
        return list(self._steps)

    def groups(self) -> list[list[Step[In, Any]]]:
        """The steps grouped as they run: one list per group, in order."""
        found: dict[int, list[Step[In, Any]]] = {}
        for step in self._steps:
            found.setdefault(step.group, []).append(step)
        return [found[index] for index in sorted(found)]

    def get(self, name: str) -> Step[In, Any]:
        for step in self._steps:
            if step.name == name:
                return step
        raise SagaDefinitionError(
            f"saga {self.name!r} has no step {name!r} (its steps: "
            f"{', '.join(s.name for s in self._steps)}); was a step renamed while "
            f"instances were in flight?"
        )

    @overload
    def step(
        self,
        name: str,
        *,
        compensate: Compensation[In, Out],
        timeout: float = ...,
        retry: RetrySettings | None = ...,
        compensation_retry: RetrySettings | None = ...,
        output: type[BaseModel] | bool | None = ...,
    ) -> Callable[[Action[In, Out]], Step[In, Out]]: ...

    @overload
    def step(
        self,
        name: str,
        *,
        compensate: None = None,
        timeout: float = ...,
        retry: RetrySettings | None = ...,
        compensation_retry: RetrySettings | None = ...,
        output: type[BaseModel] | bool | None = ...,
    ) -> _Declare[In]: ...

    def step(
        self,
        name: str,
        *,
        compensate: Compensation[In, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetrySettings | None = None,
        compensation_retry: RetrySettings | None = None,
        output: type[BaseModel] | bool | None = True,
    ) -> Callable[[Action[In, Any]], Step[In, Any]]:
        """Declare the decorated async function as the next step.

        Args:
            name: unique in the saga; part of the idempotency key.
            compensate: undoes the step; gets the context and the step's output
                (None if the outcome is unknown). Without one, the step is not undone.
            timeout: seconds one attempt may take (also for the compensation).
            retry: attempts and backoff of the action (default: 3 attempts).
            compensation_retry: the same for the compensation (default: 8).
            output: the output model, when the return annotation cannot be read
                (a model defined inside a function); default: the annotation.

        Raises:
            SagaDefinitionError: a duplicate or invalid name, a bad timeout, a
                function that is not async, or no usable output type.
        """
        _check_name("step", name)
        if self._frozen:
            raise SagaDefinitionError(
                f"saga {self.name!r} is already used by an orchestrator; declare step "
                f"{name!r} before creating the Orchestrator"
            )
        if any(step.name == name for step in self._steps):
            raise SagaDefinitionError(f"saga {self.name!r} already has a step named {name!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise SagaDefinitionError(
                f"step {name!r} of saga {self.name!r}: timeout must be a positive number of "
                f"seconds, got {timeout!r}"
            )
        if compensate is not None and not _is_async(compensate):
            raise SagaDefinitionError(
                f"the compensation of step {name!r} of saga {self.name!r} must be an "
                f"async function (async def)"
            )

        def declare(action: Action[In, Any]) -> Step[In, Any]:
            if not _is_async(action):
                raise SagaDefinitionError(
                    f"step {name!r} of saga {self.name!r} must be an async function (async def)"
                )
            model = _output_model(self.name, name, action, output)
            if self._parallel is not None:
                group = self._parallel
                self._parallel_size += 1
            else:
                group = self._groups
                self._groups += 1
            step: Step[In, Any] = Step(
                name=name,
                position=len(self._steps),
                group=group,
                action=action,
                compensate=compensate,
                output_model=model,
                timeout=timeout,
                retry=retry or DEFAULT_RETRY,
                compensation_retry=compensation_retry or DEFAULT_COMPENSATION_RETRY,
            )
            self._steps.append(step)
            return step

        return declare

    @contextmanager
    def parallel(self) -> Iterator[None]:
        """Steps declared inside the block run at the same time, as one group.

        Raises:
            SagaDefinitionError: nested, or no step declared inside.
        """
        if self._parallel is not None:
            raise SagaDefinitionError(
                f"saga {self.name!r}: parallel groups do not nest; close the first one"
            )
        self._parallel = self._groups
        self._parallel_size = 0
        try:
            yield
        finally:
            size = self._parallel_size
            self._parallel = None
            if size:
                self._groups += 1
        if not size:
            raise SagaDefinitionError(
                f"saga {self.name!r}: a parallel group declares no step; declare its steps "
                f"with @saga.step inside the `with saga.parallel():` block"
            )

    def freeze(self) -> None:
        """Check the saga is complete and refuse further steps (the orchestrator calls it).

        Raises:
            SagaDefinitionError: no step, or a parallel group still open.
        """
        if not self._steps:
            raise SagaDefinitionError(
                f"saga {self.name!r} has no steps; declare them with @saga.step(...)"
            )
        if self._parallel is not None:
            raise SagaDefinitionError(f"saga {self.name!r} has a parallel group still open")
        self._frozen = True


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SagaDefinitionError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '.' or '-' "
            f"(at most 100, starting with a letter or digit)"
        )


def _is_async(function: object) -> bool:
    import inspect

    target = getattr(function, "__call__", None)  # noqa: B004  # callable objects too
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(target)


def _output_model(
    saga: str, step: str, action: Callable[..., Any], given: type[BaseModel] | bool | None
) -> type[BaseModel] | None:
    """The output model: ``output=`` if given, else the return annotation."""
    if given is not True:
        if given is None or given is False:
            return None
        if isinstance(given, type) and issubclass(given, BaseModel):
            return given
        raise SagaDefinitionError(
            f"step {step!r} of saga {saga!r}: output= must be a pydantic model class or None"
        )
    try:
        hints = typing.get_type_hints(action)
    except NameError as exc:
        raise SagaDefinitionError(
            f"step {step!r} of saga {saga!r}: cannot resolve its return annotation ({exc}); "
            f"define the model at module level or pass output=Model to saga.step"
        ) from exc
    if "return" not in hints:
        raise SagaDefinitionError(
            f"step {step!r} of saga {saga!r} has no return annotation; annotate it with "
            f"the output model (a pydantic model) or None"
        )
    returned = hints["return"]
    if returned is type(None):
        return None
    if isinstance(returned, type) and issubclass(returned, BaseModel):
        return returned
    raise SagaDefinitionError(
        f"step {step!r} of saga {saga!r} returns {returned!r}; a step's output must be a "
        f"pydantic model (stored as JSON) or None"
    )
