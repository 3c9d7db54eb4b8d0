"""Errors as RFC 9457 problem details (``application/problem+json``), mapped once.

Every error the HTTP binding answers with goes through ``problem_for``:

* a ``WireworkError`` answers with its class's ``http_status``; its
  ``error_type`` is the class's dotted name, so ``HttpClient`` rebuilds the
  same class on the caller's side (``wirework.errors.rebuild_error``). A
  ``CallError``'s message is the ``detail`` (it is written for the caller);
  any other wirework error may name hosts or files, so its ``detail`` is the
  class's own one-line description and the message is only logged;
* invalid input answers 422 with an ``errors`` list of ``loc`` and ``msg``,
  never the input itself;
* anything else is a bug: 500 with a generic ``detail``, its traceback in
  the log and never on the wire (RELIABILITY.md §3.6).
"""

from __future__ import annotations

import http
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.types import Send

from wirework.errors import CallError, WireworkError, error_name
from wirework.http.errors import InvalidInputError

log = logging.getLogger("wirework.http")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:wirework:error:"
INTERNAL_ERROR_TYPE = "internal"
"""The ``error_type`` of an unexpected exception: no class name leaks (``RemoteError``)."""


class ProblemItem(BaseModel):
    """One invalid input: where (``["query", "limit"]``, ``["body", "items", 0]``) and why."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object, with wirework's extension members."""

    type: str
    """``urn:wirework:error:<error_type>``."""
    title: str
    """The HTTP status phrase (``Not Found``)."""
    status: int
    detail: str
    """What went wrong and what to send instead."""
    instance: str
    """The request path."""
    error_type: str
    """The dotted name of the error class (``wirework.errors.NotFoundError``), or ``internal``."""
    retriable: bool
    """Whether repeating the same call may succeed."""
    errors: list[ProblemItem] | None = None
    """For 422: every invalid input."""


def problem_for(error: BaseException, instance: str) -> dict[str, Any]:
    """The problem details object answering ``error`` for the request at ``instance``."""
    if isinstance(error, WireworkError):
        status = error.http_status
        name = error_name(type(error))
        if isinstance(error, CallError):
            detail = str(error) or _describe(type(error))
        else:
            log.warning("answering %s with %s: %s", instance, name, error)
            detail = _describe(type(error))
        retriable = type(error).retriable
    else:
        log.error("unexpected error answering %s", instance, exc_info=error)
        status = 500
        name = INTERNAL_ERROR_TYPE
        detail = "the server failed to answer; the error is in its log"
        retriable = False
    problem = make_problem(status, name, detail, instance, retriable=retriable)
    if isinstance(error, InvalidInputError):
        problem["errors"] = error.items
    return problem


def make_problem(
    status: int, error_type: str, detail: str, instance: str, *, retriable: bool = False
) -> dict[str, Any]:
    """A problem details object (a dict, serialised with orjson on the hot path)."""
    return {
        "type": TYPE_PREFIX + error_type,
        "title": _title(status),
        "status": status,
        "detail": detail,
        "instance": instance,
        "error_type": error_type,
        "retriable": retriable,
    }


async def send_problem(
    send: Send,
    problem: dict[str, Any],
    *,
    close: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Send ``problem`` as the whole response; ``close`` ends the connection after it."""
    body = orjson.dumps(problem)
    raw_headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": problem["status"], "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    error: BaseException,
    instance: str,
    *,
    close: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer ``error`` as problem+json (see ``problem_for``)."""
    await send_problem(send, problem_for(error, instance), close=close, headers=headers)


def _title(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _describe(cls: type[BaseException]) -> str:
    return (inspect.getdoc(cls) or cls.__name__).partition("\n")[0]
