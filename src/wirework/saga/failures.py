"""How the orchestrator classifies a failed attempt, and how it keeps store work whole.

Failure classes follow Temporal's: an attempt's error is retried unless it
says retrying cannot help; a timeout is retried too, but its outcome is
unknown, so the step is compensated if the saga compensates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from wirework.errors import PublishOutcomeUnknownError, WireworkError
from wirework.saga.definition import Step
from wirework.saga.errors import PermanentError, SagaDefinitionError

T = TypeVar("T")

#: Characters of an error message kept in the history.
ERROR_CHARS = 2000


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt of a step may succeed if repeated (Temporal's default).

    Every error is, except ``PermanentError`` and a ``WireworkError`` whose
    class says it is not ``retriable`` (a bad request, a not-found): those are
    definite answers. A timeout always is: its outcome is unknown, and the
    repeat carries the same idempotency key.
    """
    if isinstance(error, PermanentError):
        return False
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, WireworkError):
        return error.retriable
    return True


def outcome_unknown(error: BaseException) -> bool:
    """Whether a failed attempt may still have taken effect (so it must be compensated)."""
    return isinstance(error, TimeoutError | PublishOutcomeUnknownError)


async def settled(work: Coroutine[Any, Any, T]) -> T:
    """Await store work that a cancellation of the caller never cuts in the middle.

    A transaction cancelled while it begins or commits can leave the
    connection (and a SQLite file's write lock) held; run to its end in a task
    of its own, it commits or rolls back whatever happens to the caller, who
    still sees the cancellation at once.
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(retrieve)
    return await asyncio.shield(task)


def retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # seen here when the caller was cancelled and is gone


def describe(error: BaseException) -> dict[str, Any]:
    text = str(error) or type(error).__name__
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 1] + "…"
    kind = type(error)
    return {"error_type": f"{kind.__module__}.{kind.__qualname__}", "error": text}


class StepOutputError(SagaDefinitionError):
    """An action returned something other than its declared output (it did run: unknown)."""

    def __init__(self, step: Step[Any, Any], result: object) -> None:
        expected = step.output_model.__name__ if step.output_model else "None"
        super().__init__(
            f"step {step.name!r} returned {type(result).__name__}, not its declared output "
            f"{expected}; return a {expected}"
        )
