"""The durable orchestrator: drives saga instances from their recorded history.

``start`` records a saga and returns its id; ``run`` claims sagas nobody
holds (new ones, and those of a process that died: their lease ran out) and
drives each to a terminal state. Driving is a loop over the state machine
(``wirework.saga.state``): read the history, take the next move, record each
transition *before* acting on it, act, record the outcome, repeat. So a
``kill -9`` anywhere leaves a history another orchestrator resumes from:

* a step recorded as started and never finished has an unknown outcome: it
  is run again with the same idempotency key if it has attempts left (the
  lost attempt counts, as a Temporal start-to-close timeout does), and it is
  compensated if the saga compensates;
* a compensation recorded as started and never finished is run again with
  its own key.

Crash points (``wirework.faults``), fired right after each transition is
committed: ``saga.after_<kind>`` for every event kind (``saga_started``,
``step_started``, ``step_completed``, ``step_failed``,
``compensation_started``, ``compensation_completed``,
``compensation_failed``, ``saga_ended``), ``saga.after_step_record`` after
every step record, ``saga.after_step_effect`` after an action returned and
before its completion is recorded, and ``saga.during_compensation`` after a
compensation returned and before its completion is recorded.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from wirework.brokers.base import Broker
from wirework.clock import SYSTEM_CLOCK, Clock, wait_first
from wirework.errors import ConfigurationError, WireworkError
from wirework.faults import fault_point
from wirework.resilience.backoff import full_jitter
from wirework.resilience.deadline import Deadline, run_within
from wirework.saga import journal
from wirework.saga.definition import Saga, Step, StepContext, idempotency_key
from wirework.saga.errors import (
    PermanentError,
    SagaDefinitionError,
    SagaLeaseLostError,
)
from wirework.saga.failures import StepOutputError, describe, is_retryable, outcome_unknown, settled
from wirework.saga.journal import Pruned, SagaHistory, SagaRecord
from wirework.saga.leases import Leases
from wirework.saga.lineage import Lineage, StepTracing
from wirework.saga.state import Event, Kind, SagaStatus, StepState, fold, next_move
from wirework.store.base import Store
from wirework.store.outbox import Relay

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("wirework.saga")

In = TypeVar("In", bound=BaseModel)
T = TypeVar("T")


#: Seconds between two prunings of ended sagas, with ``retention=``.
PRUNE_INTERVAL = 3600.0

_STEP_KINDS = frozenset({Kind.STEP_STARTED, Kind.STEP_COMPLETED, Kind.STEP_FAILED})
_PUBLISHED = {
    SagaStatus.COMPENSATING: "saga.compensating",
    SagaStatus.COMPLETED: "saga.completed",
    SagaStatus.COMPENSATED: "saga.compensated",
    SagaStatus.COMPENSATION_FAILED: "saga.compensation_failed",
}


class Orchestrator:
    """Starts sagas and drives them to ``completed``, ``compensated`` or ``compensation_failed``.

    Args:
        store: where sagas and their history live (schema version 2).
        sagas: the saga types this orchestrator drives; it claims only those.
        broker: publish saga state changes (``wirework.sagas``) through the
            outbox, and run a ``Relay`` to this broker inside ``run``.
        relay: with a broker, run the relay here (False: another process relays).
        clock: for step timeouts and retry backoff.
        lease_timeout: seconds a saga stays with an orchestrator that stopped
            renewing its lease (died, paused) before another resumes it.
        poll_interval: seconds between looks for sagas to claim.
        max_sagas: sagas driven at once by this orchestrator.
        owner: this orchestrator's name in the lease (default: pid + random).
        rng: the backoff jitter's random source (seed it in tests).
        provider: the tracer provider of the step spans
            (``configure_tracing(...).provider``); None: OpenTelemetry's global
            one, once something imported OpenTelemetry (no spans without it).
        retention: prune sagas that ended this long ago while ``run`` runs
            (at its start, then every ``PRUNE_INTERVAL``); never
            ``compensation_failed`` ones. None (the default): keep every saga.

    Raises:
        SagaDefinitionError: two sagas of one name, or a saga without steps.
        ConfigurationError: a lease that is not longer than the poll interval,
            a negative retention.
    """

    def __init__(
        self,
        store: Store,
        sagas: Iterable[Saga[Any]],
        *,
        broker: Broker | None = None,
        relay: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        lease_timeout: float = 10.0,
        poll_interval: float = 0.5,
        max_sagas: int = 100,
        owner: str | None = None,
        rng: random.Random | None = None,
        provider: TracerProvider | None = None,
        retention: timedelta | None = None,
    ) -> None:
        if not 0 < poll_interval < lease_timeout:
            raise ConfigurationError(
                f"Orchestrator needs 0 < poll_interval < lease_timeout, got {poll_interval} and "
                f"{lease_timeout}"
            )
        if max_sagas < 1:
            raise ConfigurationError(f"Orchestrator max_sagas must be at least 1, got {max_sagas}")
        if retention is not None and retention < timedelta(0):
            raise ConfigurationError(f"Orchestrator retention must not be negative: {retention}")
        self.store = store
        self._sagas: dict[str, Saga[Any]] = {}
        for saga in sagas:
            if saga.name in self._sagas:
                raise SagaDefinitionError(
                    f"two sagas are named {saga.name!r}; saga names must be unique"
                )
            saga.freeze()
            self._sagas[saga.name] = saga
        if not self._sagas:
            raise SagaDefinitionError("Orchestrator needs at least one Saga to drive")
        self.broker = broker
        self._relay = Relay(store, broker) if broker is not None and relay else None
        self.clock = clock
        self.lease_timeout = lease_timeout
        self.poll_interval = poll_interval
        self.max_sagas = max_sagas
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.rng = rng or random.Random()
        self.retention = retention
        self._tracing = StepTracing(provider)
        self._driving: dict[str, asyncio.Task[None]] = {}
        self._leases = Leases(store, self.owner, lease_timeout)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def publishes(self) -> bool:
        """Whether state changes are published (a broker was given)."""
        return self.broker is not None

    def saga(self, name: str) -> Saga[Any]:
        """The saga type of this name.

        Raises:
            SagaDefinitionError: this orchestrator has no such saga.
        """
        try:
            return self._sagas[name]
        except KeyError:
            raise SagaDefinitionError(
                f"this orchestrator drives no saga {name!r} (it drives: "
                f"{', '.join(sorted(self._sagas))}); pass the Saga to Orchestrator(...)"
            ) from None

    # -- starting and reading ---------------------------------------------------------

    async def start(
        self,
        saga: Saga[In] | str,
        input: In | Mapping[str, Any],
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Record a new saga instance and return its id; ``run`` drives it.

        Starting again with the same ``saga_id`` records nothing and returns
        the id, so a caller may retry a start whose outcome it did not see.

        The saga keeps its lineage (``wirework.saga.lineage``): the current
        span's trace context, the parent of every step's span; and the
        correlation id every message its steps publish carries:
        ``correlation_id``, by default the handled message's when called from a
        handler (none: the saga id).

        Raises:
            SagaDefinitionError: a saga this orchestrator does not drive.
            ConfigurationError: an input that does not fit the saga's model, a bad id.
            SagaStateError: ``saga_id`` belongs to a saga of another name.
        """
        definition = self.saga(saga if isinstance(saga, str) else saga.name)
        try:
            model = (
                input
                if isinstance(input, definition.input)
                else definition.input.model_validate(input)
            )
        except ValidationError as exc:
            raise ConfigurationError(
                f"the input of saga {definition.name!r} does not fit "
                f"{definition.input.__name__}: {exc.errors(include_url=False)[0]['msg']}"
            ) from exc
        saga_id = saga_id or uuid.uuid4().hex
        if not saga_id.strip() or len(saga_id) > 200 or any(c.isspace() for c in saga_id):
            raise ConfigurationError(f"saga_id {saga_id!r} must be 1-200 characters without spaces")
        await settled(
            journal.create(
                self.store,
                saga_id,
                definition.name,
                model.model_dump(mode="json"),
                publish=self.publishes,
                lineage=Lineage.here(
                    correlation_id=correlation_id, trace=self._tracing.current()
                ).data(),
            )
        )
        self._reached(Kind.SAGA_STARTED)
        self._wake.set()
        return saga_id

    async def history(self, saga_id: str) -> SagaHistory:
        """The saga and every recorded event of it. Raises ``SagaNotFoundError``."""
        return await settled(journal.load(self.store, saga_id))

    async def list(
        self, *, status: SagaStatus | str | None = None, name: str | None = None, limit: int = 100
    ) -> builtins.list[SagaRecord]:
        """Saga instances, newest first, optionally of one status and one saga name."""
        return await settled(
            journal.find(
                self.store,
                status=None if status is None else SagaStatus(status),
                name=name,
                limit=limit,
            )
        )

    async def retry(self, saga_id: str) -> SagaRecord:
        """Re-drive the compensations of a ``compensation_failed`` saga (``run`` picks it up).

        Raises:
            SagaNotFoundError, SagaStateError: no such saga, or it did not fail so.
        """
        record = await settled(journal.mark_retry(self.store, saga_id, publish=self.publishes))
        log.warning("saga %s (%s) is retried: its compensations run again", saga_id, record.name)
        self._wake.set()
        return record

    async def prune(
        self, older_than: timedelta, *, include_failed: bool = False, dry_run: bool = False
    ) -> Pruned:
        """Delete the record and history of sagas that ended more than ``older_than`` ago.

        ``completed`` and ``compensated`` sagas only, and ``compensation_failed``
        ones with ``include_failed`` (they wait for an operator); never a saga in
        flight. ``dry_run`` counts and deletes nothing (``journal.prune``).

        Raises:
            ConfigurationError: a negative ``older_than``.
        """
        return await settled(
            journal.prune(
                self.store, older_than=older_than, include_failed=include_failed, dry_run=dry_run
            )
        )

    async def result(self, saga_id: str, *, timeout: float, poll: float = 0.05) -> SagaRecord:
        """Wait until the saga is terminal and return it.

        Raises:
            TimeoutError: it is not terminal after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                records = await settled(journal.load(self.store, saga_id))
                if records.saga.status.terminal:
                    return records.saga
                await asyncio.sleep(poll)

    # -- running ----------------------------------------------------------------------

    async def stop(self) -> None:
        """Ask ``run`` to return: sagas in hand are left for another orchestrator (or a restart)."""
        self._stopping.set()

    async def run(self) -> None:
        """Claim and drive sagas until ``stop``; store errors are logged and retried."""
        self._stopping.clear()
        relaying = asyncio.ensure_future(self._relay.run()) if self._relay else None
        keeping = [
            asyncio.ensure_future(self._leases.renew()),
            asyncio.ensure_future(self._leases.fence()),
        ]
        if self.retention is not None:
            keeping.append(asyncio.ensure_future(self._prune(self.retention)))
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                await self._claim()
                await wait_first(
                    self._wake, self._stopping, clock=self.clock, pause=self.poll_interval
                )
        finally:
            drivers = list(self._driving.values())
            for task in drivers:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            for task in keeping:
                task.cancel()
            await asyncio.gather(*keeping, return_exceptions=True)
            if self._relay is not None and relaying is not None:
                await self._relay.stop()
                await asyncio.gather(relaying, return_exceptions=True)

    async def _prune(self, retention: timedelta) -> None:
        """Prune ended sagas past ``retention`` now and every ``PRUNE_INTERVAL``, a batch per
        transaction (so ``stop`` never waits for a long backlog)."""
        while True:
            try:
                while True:
                    pruned = await settled(
                        journal.prune(self.store, older_than=retention, limit=journal.PRUNE_BATCH)
                    )
                    if pruned.total:
                        log.info("pruned %d ended sagas older than %s", pruned.total, retention)
                    if pruned.total < journal.PRUNE_BATCH:
                        break
            except WireworkError as exc:
                log.warning("saga orchestrator %s could not prune sagas: %s", self.owner, exc)
            await self.clock.sleep(PRUNE_INTERVAL)

    async def _claim(self) -> None:
        free = self.max_sagas - len(self._driving)
        if free <= 0:
            return
        asked = asyncio.get_running_loop().time()
        try:
            claimed = await settled(
                journal.claim(
                    self.store,
                    self.owner,
                    sorted(self._sagas),
                    lease_timeout=self.lease_timeout,
                    limit=free,
                )
            )
        except WireworkError as exc:
            log.warning("saga orchestrator %s could not claim sagas: %s", self.owner, exc)
            return
        for saga_id in claimed:
            if saga_id not in self._driving:
                self._driving[saga_id] = asyncio.ensure_future(self._hold(saga_id, asked))

    async def _hold(self, saga_id: str, asked: float) -> None:
        """Drive one claimed saga while its lease is kept; never raises but cancellation."""
        driving = asyncio.ensure_future(self._drive(saga_id))
        self._leases.hold(saga_id, asked, driving)
        stopped = False
        try:
            await driving
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                stopped = True
                raise
            log.warning("saga %s: lease lost or about to run out; stopped driving", saga_id)
        except SagaLeaseLostError as exc:
            log.warning("saga %s: %s", saga_id, exc)
        except WireworkError as exc:
            # The lease is kept until it runs out: the saga is resumed after lease_timeout,
            # here or elsewhere, which spaces out the tries while the cause lasts.
            log.warning("saga %s: %s; it is resumed in %gs", saga_id, exc, self.lease_timeout)
        except Exception:
            log.exception(
                "saga %s: the orchestrator failed while driving it; it is resumed in %gs",
                saga_id,
                self.lease_timeout,
            )
        else:
            self._wake.set()  # a slot is free
        finally:
            driving.cancel()
            await asyncio.gather(driving, return_exceptions=True)
            held = self._leases.drop(saga_id)
            if stopped and held:
                # Stopping: hand the saga over at once rather than after the lease.
                with contextlib.suppress(WireworkError):
                    await settled(journal.release(self.store, saga_id, self.owner))
            self._driving.pop(saga_id, None)

    async def _drive(self, saga_id: str) -> None:
        """Load the history once, then take moves until the saga ends, recording each."""
        history = await settled(journal.load(self.store, saga_id))
        saga = self.saga(history.saga.name)
        run = _Run(
            saga=saga,
            record=history.saga,
            events=[event.state_event() for event in history.events],
            lineage=Lineage.of(history.started),
        )
        while True:
            steps = fold(run.events)
            for name in steps:
                saga.get(name)  # a history naming an unknown step is refused, loudly
            move = next_move(saga, run.record.status, steps)
            if move is None:
                return
            if move.kind == "end":
                await self._end(run, move.status or SagaStatus.COMPLETED)
                return
            if move.kind == "run":
                await self._run_group(run, steps, move.steps)
            else:
                await self._compensate(run, steps, saga.get(move.steps[0]))

    # -- transitions ------------------------------------------------------------------

    async def _record(
        self,
        run: _Run,
        kind: Kind,
        status: SagaStatus,
        *,
        step: str | None = None,
        attempt: int | None = None,
        data: Mapping[str, Any] | None = None,
        error: str | None = None,
        publish: str | None = None,
    ) -> None:
        saga_id = run.record.saga_id
        asked = asyncio.get_running_loop().time()
        await settled(
            journal.transition(
                self.store,
                saga_id,
                self.owner,
                kind,
                status,
                lease_timeout=self.lease_timeout,
                step=step,
                attempt=attempt,
                data=data,
                error=error,
                publish=(publish, run.saga.name) if publish and self.publishes else None,
            )
        )
        self._leases.confirm(saga_id, asked)
        run.events.append(Event(kind=kind, step=step, attempt=attempt, data=dict(data or {})))
        update: dict[str, Any] = {"status": status}
        if error is not None:
            update["error"] = error
        run.record = run.record.model_copy(update=update)
        self._reached(kind)

    @staticmethod
    def _reached(kind: Kind) -> None:
        fault_point(f"saga.after_{kind.value}")
        if kind in _STEP_KINDS:
            fault_point("saga.after_step_record")

    async def _end(self, run: _Run, status: SagaStatus) -> None:
        await self._record(
            run, Kind.SAGA_ENDED, status, data={"status": status.value}, publish=_PUBLISHED[status]
        )
        record = run.record
        if status is SagaStatus.COMPENSATION_FAILED:
            log.error(
                "saga %s (%s) ended compensation_failed: %s; fix the cause, then "
                "`wirework saga retry %s`",
                record.saga_id,
                record.name,
                record.error,
                record.saga_id,
            )
        elif status is SagaStatus.COMPENSATED:
            log.warning(
                "saga %s (%s) was compensated: %s", record.saga_id, record.name, record.error
            )
        else:
            log.info("saga %s (%s) completed", record.saga_id, record.name)

    def _context(
        self,
        run: _Run,
        steps: Mapping[str, StepState],
        step: Step[Any, Any],
        attempt: int,
        *,
        compensating: bool = False,
    ) -> StepContext[Any]:
        saga, saga_id = run.saga, run.record.saga_id
        outputs = {
            other.name: other.load_output(steps[other.name].output)
            for other in saga.steps
            if other.group < step.group and other.name in steps and steps[other.name].completed
        }
        state = steps.get(step.name)
        return StepContext(
            saga_id=saga_id,
            saga=saga.name,
            step=step.name,
            idempotency_key=idempotency_key(saga_id, step.name, compensation=compensating),
            attempt=attempt,
            input=saga.input.model_validate(run.record.input),
            compensating=compensating,
            outcome_unknown=compensating and state is not None and not state.completed,
            outputs=outputs,
        )

    # -- forward ----------------------------------------------------------------------

    async def _run_group(
        self, run: _Run, steps: Mapping[str, StepState], names: tuple[str, ...]
    ) -> None:
        abort = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for name in names:
                group.create_task(self._run_step(run, steps, run.saga.get(name), abort))

    async def _run_step(
        self,
        run: _Run,
        steps: Mapping[str, StepState],
        step: Step[Any, Any],
        abort: asyncio.Event,
    ) -> None:
        state = steps.get(step.name) or StepState()
        attempts = state.attempts
        limit = step.retry.max_attempts
        if state.in_flight:
            # The orchestrator died during this attempt: its outcome is unknown.
            final = attempts >= limit or abort.is_set()
            error = (
                f"attempt {attempts} of step {step.name!r} has an unknown outcome: the "
                f"orchestrator stopped during it"
            )
            data = {"error_type": "wirework.saga.OutcomeUnknown", "error": error, "unknown": True}
            await self._step_failed(run, step, attempts, error, final=final, data=data)
            self._tracing.lost(run, step.name, attempts, reason=error)
            if final:
                abort.set()
                return
        while True:
            attempts += 1
            await self._record(
                run, Kind.STEP_STARTED, SagaStatus.RUNNING, step=step.name, attempt=attempts
            )
            context = self._context(run, steps, step, attempts)
            output: Any = None
            failure: Exception | None = None
            with self._tracing.attempt(context, run.lineage) as span:
                try:
                    output = await self._attempt(step, context)
                except Exception as exc:
                    failure = exc
                    final = not is_retryable(exc) or attempts >= limit or abort.is_set()
                    span.failed(exc, final=final)
                else:
                    span.succeeded()
            if failure is not None:
                # An output of the wrong type comes from an action that did run.
                unknown = outcome_unknown(failure) or isinstance(failure, StepOutputError)
                described = describe(failure)
                await self._step_failed(
                    run,
                    step,
                    attempts,
                    described["error"],
                    final=final,
                    data={**described, "unknown": unknown},
                )
                if final:
                    abort.set()
                    return
                await self.clock.sleep(
                    full_jitter(
                        attempts - 1,
                        base=step.retry.base_delay,
                        cap=step.retry.max_delay,
                        rng=self.rng,
                    )
                )
                if abort.is_set():
                    return  # a sibling failed for good: no new attempt
                continue
            fault_point("saga.after_step_effect")
            await self._record(
                run,
                Kind.STEP_COMPLETED,
                SagaStatus.RUNNING,
                step=step.name,
                attempt=attempts,
                data={"output": output},
            )
            return

    async def _attempt(self, step: Step[Any, Any], context: StepContext[Any]) -> Any:
        """One attempt of the action under its timeout; its output as JSON data."""
        deadline = Deadline.after(
            step.timeout, clock=self.clock, source=f"the timeout of step {step.name!r}"
        )

        async def act() -> Any:
            return await step.action(context)

        result = await run_within(deadline, act)
        if step.output_model is None:
            if result is not None:
                raise StepOutputError(step, result)
            return None
        if not isinstance(result, step.output_model):
            raise StepOutputError(step, result)
        return result.model_dump(mode="json")

    async def _step_failed(
        self,
        run: _Run,
        step: Step[Any, Any],
        attempt: int,
        error: str,
        *,
        final: bool,
        data: Mapping[str, Any],
    ) -> None:
        status = SagaStatus.COMPENSATING if final else SagaStatus.RUNNING
        await self._record(
            run,
            Kind.STEP_FAILED,
            status,
            step=step.name,
            attempt=attempt,
            data={**data, "final": final},
            error=f"step {step.name!r} failed: {error}" if final else None,
            publish=_PUBLISHED[status] if final else None,
        )
        saga_id, name = run.record.saga_id, run.saga.name
        if final:
            log.warning(
                "saga %s (%s): step %r failed for good after %d attempt(s): %s; compensating",
                saga_id, name, step.name, attempt, error,
            )  # fmt: skip
        else:
            log.info(
                "saga %s (%s): step %r attempt %d failed: %s; retrying",
                saga_id, name, step.name, attempt, error,
            )  # fmt: skip

    # -- compensation -----------------------------------------------------------------

    async def _compensate(
        self, run: _Run, steps: Mapping[str, StepState], step: Step[Any, Any]
    ) -> None:
        state = steps[step.name]
        attempts = state.compensation_attempts
        limit = step.compensation_retry.max_attempts
        compensate = step.compensate
        if compensate is None:
            return
        if state.compensation_in_flight:
            final = attempts >= limit
            error = (
                f"compensation attempt {attempts} of step {step.name!r} has an unknown "
                f"outcome: the orchestrator stopped during it"
            )
            await self._compensation_failed(
                run, step, attempts, error, final=final, data={"unknown": True}
            )
            self._tracing.lost(run, step.name, attempts, reason=error, compensating=True)
            if final:
                return
        output = step.load_output(state.output) if state.completed else None
        while True:
            attempts += 1
            await self._record(
                run,
                Kind.COMPENSATION_STARTED,
                SagaStatus.COMPENSATING,
                step=step.name,
                attempt=attempts,
            )
            context = self._context(run, steps, step, attempts, compensating=True)
            deadline = Deadline.after(
                step.timeout, clock=self.clock, source=f"the timeout of compensation {step.name!r}"
            )

            async def undo(context: StepContext[Any] = context) -> None:
                await compensate(context, output)

            failure: Exception | None = None
            with self._tracing.attempt(context, run.lineage) as span:
                try:
                    await run_within(deadline, undo)
                except Exception as exc:
                    failure = exc
                    final = isinstance(exc, PermanentError) or attempts >= limit
                    span.failed(exc, final=final)
                else:
                    span.succeeded()
            if failure is not None:
                described = describe(failure)
                await self._compensation_failed(
                    run, step, attempts, described["error"], final=final, data=described
                )
                if final:
                    return
                await self.clock.sleep(
                    full_jitter(
                        attempts - 1,
                        base=step.compensation_retry.base_delay,
                        cap=step.compensation_retry.max_delay,
                        rng=self.rng,
                    )
                )
                continue
            fault_point("saga.during_compensation")
            await self._record(
                run,
                Kind.COMPENSATION_COMPLETED,
                SagaStatus.COMPENSATING,
                step=step.name,
                attempt=attempts,
            )
            return

    async def _compensation_failed(
        self,
        run: _Run,
        step: Step[Any, Any],
        attempt: int,
        error: str,
        *,
        final: bool,
        data: Mapping[str, Any],
    ) -> None:
        await self._record(
            run,
            Kind.COMPENSATION_FAILED,
            SagaStatus.COMPENSATING,
            step=step.name,
            attempt=attempt,
            data={**data, "error": error, "final": final},
            error=f"compensation of step {step.name!r} failed: {error}" if final else None,
        )
        level = logging.ERROR if final else logging.WARNING
        log.log(
            level,
            "saga %s (%s): compensation of step %r attempt %d failed: %s%s",
            run.record.saga_id,
            run.saga.name,
            step.name,
            attempt,
            error,
            "; giving up" if final else "; retrying with backoff",
        )


@dataclass
class _Run:
    """One saga being driven: its definition, its record and its history so far."""

    saga: Saga[Any]
    record: SagaRecord
    events: builtins.list[Event]
    lineage: Lineage
    """The saga's correlation, cause and trace context, recorded when it started."""
