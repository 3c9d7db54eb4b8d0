"""One exception hierarchy for the whole package.

Every error wirework raises on purpose derives from ``WireworkError``; client
library errors are translated at the backend boundary (``raise ... from exc``)
so callers never need to import redis, aio-pika or sqlite3 to catch ours::

    WireworkError
    ├── ConfigurationError            bad URL, unknown option, invalid setting
    │   └── SagaDefinitionError       a saga or step declared wrongly
    ├── BrokerError                   anything a broker backend reports
    │   ├── BrokerUnavailableError    cannot reach / open the broker (retriable)
    │   │   └── PublishOutcomeUnknownError  sent, then the link broke: maybe stored
    │   ├── BrokerBusyError           the broker is locked by someone else (retriable)
    │   ├── BrokerClosedError         the broker or subscription was closed
    │   ├── MessageTooLargeError      publish refused: over ``max_message_bytes``
    │   ├── QueueFullError            publish refused: topic at its length limit (retriable)
    │   ├── AlreadySettledError       a delivery was acked/nacked twice
    │   └── DeadLetterNotFoundError   no dead letter with that id
    ├── DecodeError                   a message cannot become a typed event
    │   ├── DeserializationError      not a decodable CloudEvent / not JSON
    │   ├── SchemaValidationError     JSON that breaks the body's schema
    │   └── UnknownMessageTypeError   no handler registered for the event type
    ├── StoreError                    anything a store backend reports
    │   ├── StoreUnavailableError     cannot reach or open the store (retriable)
    │   ├── StoreBusyError            the SQLite file is locked past busy_timeout (retriable)
    │   ├── StoreConflictError        a serialization failure or deadlock: retry (retriable)
    │   ├── StoreQueryError           the database refused a statement (bad SQL, a constraint)
    │   ├── StoreSchemaError          the schema is newer than this wirework, or unusable
    │   ├── TransactionError          a transaction used wrongly (nested, after its end)
    │   └── StoreClosedError          the store was closed
    ├── SagaError                     anything the saga orchestrator reports
    │   ├── PermanentError            raised by a step: fail now, never retry
    │   ├── SagaNotFoundError         no saga with that id in the store
    │   ├── SagaStateError            the saga is not in a state that allows the call
    │   └── SagaLeaseLostError        another orchestrator took the saga over (retriable)
    ├── ResilienceError               a resilience policy cut or refused the call
    │   ├── DeadlineExceededError     the call's deadline passed (also a TimeoutError)
    │   ├── CircuitOpenError          the target's circuit is open: not attempted
    │   ├── BulkheadFullError         the target's concurrency limit and queue are full
    │   └── RetryBudgetExhaustedError  a retry was due but the retry budget is spent
    ├── RequestError                  a request over messaging got no good reply
    │   ├── RequestTimeoutError       no reply by the deadline (also a TimeoutError)
    │   ├── RemoteError               the responder failed; carries its error type
    │   ├── ReplyLostError            the reply inbox died with its connection (retriable)
    │   └── TooManyPendingRequestsError  the instance's pending-request limit is reached
    └── CallError                     what a REST or gRPC handler raises to answer with an error
        ├── BadRequestError           400, INVALID_ARGUMENT: the input cannot be used
        ├── UnauthenticatedError      401, UNAUTHENTICATED
        ├── PermissionDeniedError     403, PERMISSION_DENIED
        ├── NotFoundError             404, NOT_FOUND
        ├── ConflictError             409, ABORTED: the state changed under the caller
        ├── PreconditionFailedError   412, FAILED_PRECONDITION
        ├── TooManyRequestsError      429, RESOURCE_EXHAUSTED (retriable)
        └── ServiceUnavailableError   503, UNAVAILABLE (retriable)

    HandlerSignal                     raised by handlers on purpose, not errors
    ├── Retry                         retry this message after ``delay`` seconds
    ├── Reject                        dead-letter this message now (reason ``rejected``)
    └── Expired                       dead-letter this message now (reason ``expired``)

``retriable`` on a class says whether repeating the same call may succeed.
``http_status`` and ``grpc_code`` (a ``grpc.StatusCode`` name, kept as a
string so this module imports nothing) say how the class crosses REST and
gRPC: errors map once, here, and every binding reads these two attributes.
Every subclass, the user's own included, is registered by its dotted name, so
a caller can rebuild the error a remote handler raised (``rebuild_error``);
an unregistered name becomes ``RemoteError``.
"""

from __future__ import annotations

_REGISTRY: dict[str, type[WireworkError]] = {}


def error_name(cls: type[BaseException]) -> str:
    """The dotted name an error travels under (``module.QualName``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class WireworkError(Exception):
    """Root of every error wirework raises on purpose."""

    retriable: bool = False
    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[error_name(cls)] = cls


class ConfigurationError(WireworkError):
    """A setting, option or URL is invalid; the message says what to write instead."""


class BrokerError(WireworkError):
    """A broker backend failed to do what was asked."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached or opened; retrying later may succeed."""

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


class PublishOutcomeUnknownError(BrokerUnavailableError):
    """A publish was sent, then the connection broke before the broker answered.

    Unlike its parent, this does not mean "nothing was stored": the message
    may have been stored. Count it as unknown (Jepsen's ``info``), and let an
    idempotent consumer absorb the copy if the caller publishes it again.
    """


class BrokerBusyError(BrokerError):
    """The broker's storage is locked by another party past the busy timeout.

    The operation had no effect: a publish that raised this was not stored.
    """

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


class BrokerClosedError(BrokerError):
    """The broker or subscription was closed before or during the call."""


class MessageTooLargeError(BrokerError):
    """A message is over the broker's ``max_message_bytes``; nothing was stored."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, size: int, limit: int, *, topic: str) -> None:
        super().__init__(
            f"message for topic {topic!r} is {size} bytes, over the limit of {limit} bytes "
            f"(max_message_bytes); send a reference to the payload instead, "
            f"or raise the limit on the broker"
        )
        self.size = size
        self.limit = limit
        self.topic = topic


class QueueFullError(BrokerError):
    """The topic holds ``max_queue_length`` messages already (reject-publish backpressure)."""

    retriable = True
    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"


class AlreadySettledError(BrokerError):
    """A delivery was settled (ack, nack or dead-letter) more than once."""


class DeadLetterNotFoundError(BrokerError):
    """No dead-letter record has the given id."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class DecodeError(WireworkError):
    """A delivered message cannot become a typed event; retrying cannot help."""

    reason: str = "deserialization_error"
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DeserializationError(DecodeError):
    """The bytes are not a CloudEvent wirework can read (bad JSON, bad UTF-8, missing id)."""

    reason = "deserialization_error"


class SchemaValidationError(DecodeError):
    """The event's data breaks its model; ``field`` is a JSON pointer to the first bad field."""

    reason = "schema_validation"
    http_status = 422


class UnknownMessageTypeError(DecodeError):
    """The event's ``type`` names no registered handler."""

    reason = "unknown_message_type"


class RequestError(WireworkError):
    """A request over messaging did not end in a good reply."""


class RequestTimeoutError(RequestError, TimeoutError):
    """No reply arrived by the deadline; the request may still be handled later."""

    retriable = True
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(
            f"no reply to {subject!r} within {timeout:g}s; is a responder running? "
            f"`wirework topics` shows the backlog on {subject!r}"
        )
        self.subject = subject
        self.timeout = timeout


class RemoteError(RequestError):
    """The responder failed; ``remote_type`` names its error class, ``reason`` why."""

    http_status = 502
    grpc_code = "UNKNOWN"

    def __init__(self, remote_type: str, message: str, *, reason: str = "handler_error") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.reason = reason


class ReplyLostError(RequestError):
    """The caller's reply inbox died with its connection, so this reply can never arrive.

    The request may still have been handled: retry it only if it is safe to repeat.
    """

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, subject: str, address: str) -> None:
        super().__init__(
            f"the reply to {subject!r} cannot arrive: this instance's reply inbox "
            f"{address!r} was lost with its broker connection (a new one replaces it). "
            f"The request may still be handled; retry it if it is safe to repeat"
        )
        self.subject = subject
        self.address = address


class TooManyPendingRequestsError(RequestError):
    """This instance already waits for ``max_pending`` replies (RELIABILITY.md §3.7)."""

    retriable = True
    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"


class CallError(WireworkError):
    """Raise a subclass in a REST or gRPC handler to answer with its status and message.

    The message is what the caller sees (problem+json ``detail``, gRPC status
    details): say what was wrong and what to send instead; never put secrets in it.
    """


class BadRequestError(CallError):
    """The input is well-formed but cannot be used (say which field and why)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class UnauthenticatedError(CallError):
    """The caller did not say who it is, or the credentials are invalid."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(CallError):
    """The caller is known and may not do this."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class NotFoundError(CallError):
    """The thing the call names does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ConflictError(CallError):
    """The state changed under the caller (a concurrent update, a duplicate); re-read, retry."""

    http_status = 409
    grpc_code = "ABORTED"


class PreconditionFailedError(CallError):
    """The system is not in the state this call needs (an order already shipped)."""

    http_status = 412
    grpc_code = "FAILED_PRECONDITION"


class TooManyRequestsError(CallError):
    """The caller is over its rate or quota; retry later."""

    retriable = True
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class ServiceUnavailableError(CallError):
    """The service cannot answer right now (a dependency is down); retry later."""

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


def rebuild_error(name: str, message: str) -> WireworkError:
    """The error a remote handler raised, rebuilt on the caller's side.

    A registered class (any ``WireworkError`` subclass imported in this
    process) comes back as itself with the remote message, whatever its
    constructor takes; any other name becomes ``RemoteError``.
    """
    cls = _REGISTRY.get(name)
    if cls is None or issubclass(cls, RemoteError):
        return RemoteError(name, message)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


class HandlerSignal(Exception):
    """Base of the signals a handler raises on purpose to steer its message."""


class Retry(HandlerSignal):
    """Retry the current message after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested by handler")
        self.delay = delay


class Reject(HandlerSignal):
    """Dead-letter the current message at once with reason ``rejected``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Expired(HandlerSignal):
    """Dead-letter the current message at once with reason ``expired`` (its deadline passed)."""

    def __init__(self, reason: str = "deadline passed before handling") -> None:
        super().__init__(reason)
        self.reason = reason


# Stores (wirework.store).


class StoreError(WireworkError):
    """A store backend failed to do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or opened; retrying later may succeed."""

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


class StoreBusyError(StoreError):
    """Another process holds the SQLite file's write lock past ``busy_timeout``.

    The transaction had no effect.
    """

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


class StoreConflictError(StoreError):
    """The database aborted the transaction to keep it serializable (or to end a deadlock).

    Nothing was committed; running the whole transaction again may succeed.
    """

    retriable = True
    http_status = 409
    grpc_code = "ABORTED"


class StoreQueryError(StoreError):
    """The database refused a statement: invalid SQL, a broken constraint, a wrong type.

    ``sqlstate`` is PostgreSQL's error code when there is one.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class StoreSchemaError(StoreError):
    """The database's wirework schema cannot be used by this version of wirework."""


class TransactionError(StoreError):
    """A transaction was used outside its ``async with`` block, or opened inside another."""


class StoreClosedError(StoreError):
    """The store was closed before or during the call."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


# Sagas (wirework.saga).


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


# Resilience policies (wirework.resilience). None is retriable: each one means
# "this call, now, should stop", and a retry loop that ignored that would hammer
# an open breaker, a full bulkhead or a spent budget.


class ResilienceError(WireworkError):
    """A resilience policy cut or refused the call; an upstream error, if any, is the cause."""


class DeadlineExceededError(ResilienceError, TimeoutError):
    """The call's deadline passed: it was cut, or never started (also a ``TimeoutError``)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class CircuitOpenError(ResilienceError):
    """The target's circuit breaker is open (or busy probing): the call was not attempted.

    ``retry_after`` is how many seconds remain before the breaker lets a probe
    through (0.0 when unknown, e.g. on an error rebuilt from a remote reply).
    """

    http_status = 503
    grpc_code = "UNAVAILABLE"
    retry_after: float = 0.0

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BulkheadFullError(ResilienceError):
    """The target's concurrency limit and its wait queue are both full: rejected at once."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class RetryBudgetExhaustedError(ResilienceError):
    """A retry was due, but retries to the target already use up the retry budget.

    The last attempt's error is the ``__cause__``.
    """

    http_status = 503
    grpc_code = "UNAVAILABLE"
