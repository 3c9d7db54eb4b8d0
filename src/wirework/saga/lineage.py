"""A saga's lineage: the correlation, cause and trace context its steps' messages carry.

``Orchestrator.start`` records the lineage in the ``saga_started`` event (no
column, so no schema change): the correlation id (given, or the handled
message's), the handled message as the cause, and the W3C trace context
current at the start. Whichever orchestrator drives the saga later (another
process, after a crash) reads it back from the history.

While a step or compensation runs, ``step_scope`` makes a stand-in for the
saga the message being handled (``wirework.consumer.current_incoming``), so
everything the step publishes through a service (``publish``, ``send``,
``request``) or its outbox (``tx.publish``) carries the saga's correlation id
and, as its cause, the message that started the saga (the saga id when none
did), exactly as a handler's messages do. ``SagaLineage``, a publish
middleware, adds the ``sagaid`` extension to them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from wirework.brokers.base import DeadLetterReason, Delivery, Failure
from wirework.consumer import Incoming, Route, current_incoming
from wirework.envelope import SAGA_EXTENSION, Envelope, encode_binary
from wirework.errors import AlreadySettledError
from wirework.saga.definition import Saga, StepContext
from wirework.saga.journal import TOPIC, SagaRecord

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from wirework.service.binding import Publish
    from wirework.tracing.saga_spans import SagaSpans

#: The ``source`` of the stand-in message a step runs under.
STEP_SOURCE = "/wirework/saga"

_KEYS = ("correlation_id", "causation_id", "traceparent", "tracestate")

current_saga: ContextVar[str | None] = ContextVar("wirework_saga", default=None)
"""The id of the saga whose step (or compensation) runs in this task, if any."""


@dataclass(frozen=True)
class Lineage:
    """What a saga was started with, beyond its input; every field may be missing."""

    correlation_id: str | None = None
    causation_id: str | None = None
    """The message being handled when the saga was started."""
    traceparent: str | None = None
    tracestate: str | None = None

    @classmethod
    def here(cls, *, correlation_id: str | None, trace: Mapping[str, str]) -> Lineage:
        """The lineage of a saga started now: inside a handler, its message's.

        Args:
            correlation_id: given to ``start``; default the handled message's.
            trace: ``traceparent`` (and ``tracestate``) of the current span, if any.
        """
        incoming = current_incoming.get()
        cause = incoming.envelope if incoming is not None else None
        if correlation_id is None and cause is not None:
            correlation_id = cause.correlationid or cause.id
        return cls(
            correlation_id=correlation_id,
            causation_id=cause.id if cause is not None else None,
            traceparent=trace.get("traceparent"),
            tracestate=trace.get("tracestate"),
        )

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Lineage:
        """Read back from the ``saga_started`` event's data."""
        return cls(**{key: str(data[key]) for key in _KEYS if data.get(key)})

    def data(self) -> dict[str, str]:
        """The fields to keep in the ``saga_started`` event's data (the missing ones left out)."""
        return {key: value for key in _KEYS if (value := getattr(self, key))}


@contextmanager
def step_scope(saga_id: str, lineage: Lineage, input: BaseModel, attempt: int) -> Iterator[None]:
    """Run a step of ``saga_id`` as if it handled a message of the saga (see the module doc)."""
    stand_in = Envelope(
        id=lineage.causation_id or saga_id,
        source=STEP_SOURCE,
        type="saga.step",
        subject=saga_id,
        key=saga_id,
        correlationid=lineage.correlation_id or saga_id,
        traceparent=lineage.traceparent,
        tracestate=lineage.tracestate,
        extensions={SAGA_EXTENSION: saga_id},
    )
    incoming = Incoming(
        delivery=_StepDelivery(stand_in, attempt), envelope=stand_in, route=_ROUTE, body=input
    )
    saga_token = current_saga.set(saga_id)
    token = current_incoming.set(incoming)
    try:
        yield
    finally:
        current_incoming.reset(token)
        current_saga.reset(saga_token)


class Running(Protocol):
    """The saga being driven, as ``lost`` reads it (the orchestrator's ``_Run``)."""

    @property
    def saga(self) -> Saga[Any]: ...

    @property
    def record(self) -> SagaRecord: ...

    @property
    def lineage(self) -> Lineage: ...


class AttemptOutcome(Protocol):
    """How an attempt ended, told to its span (``wirework.tracing.saga_spans.AttemptSpan``)."""

    def succeeded(self) -> None: ...

    def failed(self, error: BaseException, *, final: bool) -> None: ...


class _Untraced:
    """Told how an attempt ended when tracing is off, and does nothing with it."""

    def succeeded(self) -> None:
        return None

    def failed(self, error: BaseException, *, final: bool) -> None:
        return None


class StepTracing:
    """The spans of step attempts (``wirework.tracing.saga_spans``), when tracing is on.

    With no ``provider``, OpenTelemetry's global one is used once something in
    the process imported OpenTelemetry; until then (and without the tracing
    extra) nothing is imported and attempts run without spans.
    """

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self._spans: SagaSpans | None = None
        self._missing = False
        """OpenTelemetry's API is imported but wirework's tracing extra is incomplete."""

    def _on(self) -> bool:
        if self.provider is not None:
            return True
        return not self._missing and "opentelemetry.trace" in sys.modules

    def spans(self) -> SagaSpans | None:
        if self._spans is None and self._on():
            try:
                from wirework.tracing.saga_spans import SagaSpans
            except ModuleNotFoundError:
                if self.provider is not None:
                    raise
                self._missing = True
                return None
            self._spans = SagaSpans(self.provider)
        return self._spans

    def current(self) -> dict[str, str]:
        """The current trace context, to record with a saga being started."""
        if self.spans() is None:
            return {}  # nothing imported OpenTelemetry, so no span can be current
        from wirework.tracing.saga_spans import current_trace_context

        return current_trace_context()

    @contextmanager
    def attempt(self, context: StepContext[Any], lineage: Lineage) -> Iterator[AttemptOutcome]:
        """One attempt's scope: the saga's lineage, and its span when tracing is on."""
        spans = self.spans()
        with step_scope(context.saga_id, lineage, context.input, context.attempt):
            if spans is None:
                yield _UNTRACED
                return
            with spans.attempt(
                saga_id=context.saga_id,
                saga=context.saga,
                step=context.step,
                attempt=context.attempt,
                compensating=context.compensating,
                traceparent=lineage.traceparent,
                tracestate=lineage.tracestate,
            ) as span:
                yield span

    def lost(
        self, run: Running, step: str, attempt: int, *, reason: str, compensating: bool = False
    ) -> None:
        """Trace an attempt an orchestrator died in (its own span was lost with it)."""
        spans = self.spans()
        if spans is not None:
            spans.lost(
                saga_id=run.record.saga_id,
                saga=run.saga.name,
                step=step,
                attempt=attempt,
                compensating=compensating,
                traceparent=run.lineage.traceparent,
                tracestate=run.lineage.tracestate,
                reason=reason,
            )


_UNTRACED = _Untraced()


class SagaLineage:
    """Publish middleware: messages a saga step publishes carry the ``sagaid`` extension.

    Add it to each service whose client calls steps make, before
    ``wirework.tracing.instrument`` so the publish span records the saga id too::

        svc.use_publish(SagaLineage)
        instrument(svc)
    """

    def __init__(self, app: Publish) -> None:
        self.app = app

    async def __call__(self, topic: str, envelope: Envelope, key: str | None, delay: float) -> None:
        saga_id = current_saga.get()
        if saga_id is not None and SAGA_EXTENSION not in envelope.extensions:
            extensions = {**envelope.extensions, SAGA_EXTENSION: saga_id}
            envelope = envelope.model_copy(update={"extensions": extensions})
        await self.app(topic, envelope, key, delay)


class _StepDelivery(Delivery):
    """The delivery of the stand-in message: there is nothing to settle."""

    def __init__(self, envelope: Envelope, attempt: int) -> None:
        self.message = encode_binary(envelope)
        self.topic = TOPIC
        self.group = "wirework.saga"
        self.key = envelope.key
        self.attempt = attempt
        self.first_failure_at = None

    @property
    def settled(self) -> bool:
        return True

    async def ack(self) -> None:
        raise AlreadySettledError("a saga step runs on no delivery; there is nothing to ack")

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        raise AlreadySettledError("a saga step runs on no delivery; there is nothing to nack")

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        raise AlreadySettledError("a saga step runs on no delivery; there is nothing to settle")


class _NoBody(BaseModel):
    pass


async def _no_handler(body: BaseModel, envelope: Envelope) -> None:
    return None


_ROUTE: Route[Any] = Route(None, _NoBody, _no_handler)
