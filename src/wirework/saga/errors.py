"""The saga's errors.

They belong in the one tree of ``wirework/errors.py`` (``StepOutputError`` is
defined in ``wirework.saga.failures``)::

    WireworkError
    ├── ConfigurationError
    │   └── SagaDefinitionError      a saga or step declared wrongly
    │       └── StepOutputError      an action returned something not its declared output
    └── SagaError                     anything the orchestrator reports
        ├── PermanentError            raised by a step: fail now, never retry
        ├── SagaNotFoundError         no saga with that id in the store
        ├── SagaStateError            the saga is not in a state that allows the call
        └── SagaLeaseLostError        another orchestrator took the saga over (retriable)
"""

from __future__ import annotations

from wirework.errors import ConfigurationError, WireworkError


class SagaDefinitionError(ConfigurationError):
    """A saga or one of its steps is declared wrongly; the message says what to write."""


class SagaError(WireworkError):
    """The saga orchestrator could not do what was asked."""


class PermanentError(SagaError):
    """Raise in a step's action when retrying cannot help (a declined card, a bad address).

    The step fails at once, with no further attempt, and the saga compensates.
    The action is taken to have had no effect, so the step itself is not
    compensated (unless an earlier attempt's outcome was unknown).
    """

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


class SagaNotFoundError(SagaError):
    """No saga with the given id is recorded in the store."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class SagaStateError(SagaError):
    """The saga is not in a state that allows this (retry of one that did not fail, ...)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class SagaLeaseLostError(SagaError):
    """Another orchestrator holds the saga now (this one's lease ran out); nothing was recorded."""

    retriable = True
    http_status = 409
    grpc_code = "ABORTED"
