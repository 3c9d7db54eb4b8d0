"""Durable sagas: ordered steps with compensations, driven by an orchestrator from the store.

Declare a saga, start instances, run an orchestrator (see docs/saga.md)::

    saga = Saga("fulfilment", FulfilOrder)

    @saga.step("reserve", compensate=release, timeout=2)
    async def reserve(ctx: StepContext[FulfilOrder]) -> Reservation: ...

    orchestrator = Orchestrator(store, [saga], broker=broker, retention=timedelta(days=7))
    saga_id = await orchestrator.start(saga, FulfilOrder(order_id="o-1", sku="A-1"))
    await orchestrator.run()  # until stop()

Each step attempt runs in a span whose parent is the trace context current at
``start``, and the messages a step publishes carry the saga's correlation id
(``wirework.saga.lineage``).

Every transition is recorded in the store before it is acted on, so an
orchestrator killed anywhere is resumed by another (or by its restart); every
saga ends ``completed``, ``compensated`` or ``compensation_failed``
(RELIABILITY.md P7).
"""

from wirework.saga.definition import Saga as Saga
from wirework.saga.definition import Step as Step
from wirework.saga.definition import StepContext as StepContext
from wirework.saga.definition import idempotency_key as idempotency_key
from wirework.saga.errors import PermanentError as PermanentError
from wirework.saga.errors import SagaDefinitionError as SagaDefinitionError
from wirework.saga.errors import SagaError as SagaError
from wirework.saga.errors import SagaLeaseLostError as SagaLeaseLostError
from wirework.saga.errors import SagaNotFoundError as SagaNotFoundError
from wirework.saga.errors import SagaStateError as SagaStateError
from wirework.saga.failures import is_retryable as is_retryable
from wirework.saga.journal import TOPIC as TOPIC
from wirework.saga.journal import Pruned as Pruned
from wirework.saga.journal import SagaChanged as SagaChanged
from wirework.saga.journal import SagaEvent as SagaEvent
from wirework.saga.journal import SagaHistory as SagaHistory
from wirework.saga.journal import SagaRecord as SagaRecord
from wirework.saga.lineage import SagaLineage as SagaLineage
from wirework.saga.orchestrator import Orchestrator as Orchestrator
from wirework.saga.state import Kind as Kind
from wirework.saga.state import SagaStatus as SagaStatus

__all__ = [
    "TOPIC",
    "Kind",
    "Orchestrator",
    "PermanentError",
    "Pruned",
    "Saga",
    "SagaChanged",
    "SagaDefinitionError",
    "SagaError",
    "SagaEvent",
    "SagaHistory",
    "SagaLeaseLostError",
    "SagaLineage",
    "SagaNotFoundError",
    "SagaRecord",
    "SagaStateError",
    "SagaStatus",
    "Step",
    "StepContext",
    "idempotency_key",
    "is_retryable",
]
