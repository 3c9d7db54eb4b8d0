"""One exception hierarchy for the whole package.

Every error wirework raises on purpose derives from ``WireworkError``; client
library errors are translated at the backend boundary (``raise ... from exc``)
so callers never need to import redis, aio-pika or sqlite3 to catch ours::

    WireworkError
    ├── ConfigurationError            bad URL, unknown option, invalid setting
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
    └── RequestError                  a request over messaging got no good reply
        ├── RequestTimeoutError       no reply by the deadline (also a TimeoutError)
        ├── RemoteError               the responder failed; carries its error type
        └── TooManyPendingRequestsError  the instance's pending-request limit is reached

    HandlerSignal                     raised by handlers on purpose, not errors
    ├── Retry                         retry this message after ``delay`` seconds
    ├── Reject                        dead-letter this message now (reason ``rejected``)
    └── Expired                       dead-letter this message now (reason ``expired``)

``retriable`` on a class says whether repeating the same call may succeed.
"""

from __future__ import annotations


class WireworkError(Exception):
    """Root of every error wirework raises on purpose."""

    retriable: bool = False


class ConfigurationError(WireworkError):
    """A setting, option or URL is invalid; the message says what to write instead."""


class BrokerError(WireworkError):
    """A broker backend failed to do what was asked."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached or opened; retrying later may succeed."""

    retriable = True


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


class BrokerClosedError(BrokerError):
    """The broker or subscription was closed before or during the call."""


class MessageTooLargeError(BrokerError):
    """A message is over the broker's ``max_message_bytes``; nothing was stored."""

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


class AlreadySettledError(BrokerError):
    """A delivery was settled (ack, nack or dead-letter) more than once."""


class DeadLetterNotFoundError(BrokerError):
    """No dead-letter record has the given id."""


class DecodeError(WireworkError):
    """A delivered message cannot become a typed event; retrying cannot help."""

    reason: str = "deserialization_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DeserializationError(DecodeError):
    """The bytes are not a CloudEvent wirework can read (bad JSON, bad UTF-8, missing id)."""

    reason = "deserialization_error"


class SchemaValidationError(DecodeError):
    """The event's data breaks its model; ``field`` is a JSON pointer to the first bad field."""

    reason = "schema_validation"


class UnknownMessageTypeError(DecodeError):
    """The event's ``type`` names no registered handler."""

    reason = "unknown_message_type"


class RequestError(WireworkError):
    """A request over messaging did not end in a good reply."""


class RequestTimeoutError(RequestError, TimeoutError):
    """No reply arrived by the deadline; the request may still be handled later."""

    retriable = True

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(
            f"no reply to {subject!r} within {timeout:g}s; is a responder running? "
            f"`wirework topics` shows the backlog on {subject!r}"
        )
        self.subject = subject
        self.timeout = timeout


class RemoteError(RequestError):
    """The responder failed; ``remote_type`` names its error class, ``reason`` why."""

    def __init__(self, remote_type: str, message: str, *, reason: str = "handler_error") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.reason = reason


class TooManyPendingRequestsError(RequestError):
    """This instance already waits for ``max_pending`` replies (RELIABILITY.md §3.7)."""

    retriable = True


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
