"""The saga's errors; they live in ``wirework.errors`` (the one tree) and are named here too.

``StepOutputError`` (a ``SagaDefinitionError``) is defined in ``wirework.saga.failures``.
"""

from __future__ import annotations

from wirework.errors import (
    PermanentError,
    SagaDefinitionError,
    SagaError,
    SagaLeaseLostError,
    SagaNotFoundError,
    SagaStateError,
)

__all__ = [
    "PermanentError",
    "SagaDefinitionError",
    "SagaError",
    "SagaLeaseLostError",
    "SagaNotFoundError",
    "SagaStateError",
]
