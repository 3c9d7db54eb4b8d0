"""The errors only the HTTP binding raises: invalid input, limits (DEV-25), routing, the client.

The server's subclass ``CallError``, so they cross the wire like a handler's
own errors: problem+json with their status, rebuilt by ``HttpClient`` on the
caller's side (``error_type`` is their dotted name). The client's own say
that the call did not get an answer from the endpoint at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from wirework.errors import BadRequestError, CallError, RemoteError, ServiceUnavailableError


class PayloadTooLargeError(CallError):
    """413: the request body (or one NDJSON message of a stream) is over ``max_body_bytes``."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class HeadersTooLargeError(CallError):
    """431: too many request headers, or too many bytes of them (``HttpLimits``)."""

    http_status = 431
    grpc_code = "RESOURCE_EXHAUSTED"


class MethodNotAllowedError(CallError):
    """405: the path exists, but not with this method; the ``Allow`` header lists those it has."""

    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class InvalidInputError(BadRequestError):
    """422: path, query or body values break the endpoint's models; ``items`` lists each one.

    A ``BadRequestError`` (gRPC's ``INVALID_ARGUMENT``), answered with the
    more precise 422 over HTTP.
    """

    http_status = 422
    grpc_code = "INVALID_ARGUMENT"
    items: list[dict[str, Any]] = []  # a default for an error rebuilt elsewhere; never mutated
    """Each invalid value: ``loc``, ``msg``, ``type`` (empty on an error rebuilt elsewhere)."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        where = ", ".join(".".join(str(part) for part in item["loc"]) for item in items[:5])
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        super().__init__(f"invalid input: {where}{more}; see `errors` for each one")
        self.items = list(items)


def validation_items(error: ValidationError, prefix: Iterable[str | int]) -> list[dict[str, Any]]:
    """``loc``/``msg``/``type`` for each error in ``error``, without the input values."""
    start = list(prefix)
    return [
        {"loc": [*start, *item["loc"]], "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_url=False, include_input=False, include_context=False)
    ]


class UnsupportedEncodingError(CallError):
    """415: a ``Content-Encoding`` the server does not decode (it decodes gzip and deflate)."""

    http_status = 415
    grpc_code = "INVALID_ARGUMENT"


# -- raised by HttpClient on the caller's side ------------------------------------------


class ServiceUnreachableError(ServiceUnavailableError):
    """No connection to the service could be made: nothing was sent (retriable)."""


class ConnectionLostError(ServiceUnavailableError):
    """The connection broke during the call: the server may or may not have acted on it.

    Retriable for the retry policy, which repeats only idempotent calls or
    calls carrying an ``Idempotency-Key``.
    """


class UnexpectedResponseError(RemoteError):
    """An answer that is not the endpoint's: a status without problem+json (a proxy's HTML 502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"http_{status}", message, reason="unexpected_response")
        self.status = status
