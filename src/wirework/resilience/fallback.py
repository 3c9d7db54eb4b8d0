"""``Fallback``: answer with a stand-in when a call fails in a way the caller can live with.

A cached price, an empty recommendation list, "unknown" stock: the caller
names the errors it accepts a stand-in for, and either the value or a
function of the error that makes it (sync or async). Cancellation is never
caught, and neither is any error not named.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from wirework.errors import ConfigurationError

T = TypeVar("T")

_UNSET: Any = object()


class Fallback:
    """On one of the ``on`` errors, return ``value``, or what ``function(error)`` returns.

    The stand-in must be of the call's own result type; a ``Pipeline`` cannot
    check that for you.

    Args:
        on: the error types to replace (e.g. ``(CircuitOpenError, DeadlineExceededError)``).
        value: the stand-in value.
        function: makes the stand-in from the error; may be async.

    Raises:
        ConfigurationError: no error types, or not exactly one of ``value`` and ``function``.
    """

    def __init__(
        self,
        on: type[Exception] | tuple[type[Exception], ...],
        *,
        value: Any = _UNSET,
        function: Callable[[Exception], Any] | None = None,
    ) -> None:
        self.on = on if isinstance(on, tuple) else (on,)
        if not self.on:
            raise ConfigurationError("Fallback(on=()): name at least one error type to replace")
        if (value is _UNSET) == (function is None):
            raise ConfigurationError(
                "Fallback needs exactly one of value=... (a fixed stand-in) or "
                "function=... (made from the error)"
            )
        self.value = value
        self.function = function
        self.used = 0

    def __repr__(self) -> str:
        return f"Fallback(on={tuple(error.__name__ for error in self.on)})"

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()``; on an ``on`` error, the stand-in instead."""
        try:
            return await fn()
        except self.on as exc:
            self.used += 1
            if self.function is None:
                return cast(T, self.value)
            made = self.function(exc)
            if inspect.isawaitable(made):
                made = await made
            return cast(T, made)
