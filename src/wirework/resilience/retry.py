"""``Retry``: a few more attempts for calls that are safe to repeat, within a budget.

Whether to retry is decided by ``Retry.decide``, plain logic over the
attempt, the error, the time left and the budget; ``Retry.call`` is the thin
loop that runs attempts and sleeps on the injected clock between them.

The rules, in the order they are checked:

1. Only *retryable* errors: a ``WireworkError`` whose class says
   ``retriable``, or one the caller's ``retry_if`` accepts. A
   ``ResilienceError`` never is (an open breaker, a full bulkhead, a spent
   budget mean "stop now"), except a ``DeadlineExceededError`` from a
   per-try timeout while the call's own deadline still has time.
2. Only calls that are safe to repeat: the caller says ``idempotent=True``
   or gives an ``idempotency_key`` (which the request itself must carry, so
   the upstream can tell the repeat). Neither: one attempt, whatever the
   error. This is the rule, not an option: a POST without a key is never
   retried (Linkerd's ``isRetryable``; RELIABILITY.md P9).
3. At most ``max_attempts`` attempts.
4. No sleep that would end past the deadline, and no attempt started past it.
5. The target's retry budget must hold one more retry
   (``RetryBudgetExhaustedError`` otherwise, with the last error as cause).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.errors import (
    ConfigurationError,
    DeadlineExceededError,
    ResilienceError,
    RetryBudgetExhaustedError,
    WireworkError,
)
from wirework.resilience.backoff import full_jitter
from wirework.resilience.budget import RetryBudget
from wirework.resilience.deadline import Deadline, current_deadline, run_within, tighter
from wirework.resilience.settings import RetrySettings

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""HTTP methods RFC 9110 §9.2.2 defines as idempotent; POST and PATCH are not."""


def is_idempotent_method(method: str) -> bool:
    """Whether an HTTP method is idempotent by definition (so a client may pass ``idempotent``)."""
    return method.upper() in IDEMPOTENT_METHODS


def check_idempotency_key(key: str | None) -> None:
    """Refuse a blank idempotency key: it would make a call retryable without protecting it.

    Raises:
        ConfigurationError: ``key`` is an empty or all-blank string.
    """
    if key is not None and not key.strip():
        raise ConfigurationError(
            "idempotency_key is blank; pass a stable key per logical operation "
            "(the same on every attempt), or None if the call has none"
        )


class StopReason(StrEnum):
    """Why a call got no further attempt."""

    NOT_RETRYABLE = "not_retryable"
    NOT_IDEMPOTENT = "not_idempotent"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    DEADLINE = "deadline"
    BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt: sleep ``delay`` then retry, or stop for ``reason``."""

    delay: float | None = None
    reason: StopReason | None = None

    @property
    def retry(self) -> bool:
        return self.delay is not None


@dataclass
class RetryStats:
    """Counts since start: calls, attempts (first ones included), retries, and why calls stopped."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    stopped: Counter[StopReason] = field(default_factory=Counter)


class Retry:
    """Retry failed attempts with exponential backoff and full jitter, within a budget.

    One ``Retry`` per target: its budget is shared by every call through it.

    Args:
        settings: attempts, backoff, per-try timeout and budget (defaults if None).
        clock: where the time is read and backoff sleeps happen.
        name: the target, for error messages.
        retry_if: also retry errors this returns True for (e.g. ``ConnectionError``).
        rng: the jitter's random source (seed it in tests).
    """

    def __init__(
        self,
        settings: RetrySettings | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "",
        retry_if: Callable[[Exception], bool] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or RetrySettings()
        self.clock = clock
        self.name = name
        self.retry_if = retry_if
        self.rng = rng or random.Random()
        budget = self.settings.budget
        self.budget = RetryBudget(
            ratio=budget.ratio, min_per_second=budget.min_per_second, window=budget.window
        )
        self.stats = RetryStats()

    def __repr__(self) -> str:
        return f"Retry(max_attempts={self.settings.max_attempts})"

    def is_retryable(self, error: Exception, *, remaining: float | None) -> bool:
        """Whether ``error`` may go away on another attempt (rule 1 of the module docstring)."""
        if isinstance(error, DeadlineExceededError):
            # Cut by a tighter deadline inside (a per-try timeout) while ours has time left.
            return remaining is None or remaining > 0
        if isinstance(error, ResilienceError):
            return False
        if isinstance(error, WireworkError) and error.retriable:
            return True
        return self.retry_if is not None and self.retry_if(error)

    def decide(
        self,
        attempt: int,
        error: Exception,
        *,
        may_repeat: bool,
        now: float,
        remaining: float | None,
    ) -> Decision:
        """Decide what follows failed attempt number ``attempt`` (1-based).

        Spends one retry from the budget when the answer is to retry.

        Args:
            attempt: the attempt that just failed.
            error: how it failed.
            may_repeat: the call is idempotent or carries an idempotency key.
            now: the clock's monotonic time.
            remaining: seconds left before the deadline (None: no deadline).
        """
        if not self.is_retryable(error, remaining=remaining):
            return Decision(reason=StopReason.NOT_RETRYABLE)
        if not may_repeat:
            return Decision(reason=StopReason.NOT_IDEMPOTENT)
        if attempt >= self.settings.max_attempts:
            return Decision(reason=StopReason.ATTEMPTS_EXHAUSTED)
        delay = full_jitter(
            attempt - 1,
            base=self.settings.base_delay,
            cap=self.settings.max_delay,
            rng=self.rng,
        )
        if remaining is not None and delay >= remaining:
            return Decision(reason=StopReason.DEADLINE)
        if not self.budget.try_spend(now):
            return Decision(reason=StopReason.BUDGET_EXHAUSTED)
        return Decision(delay=delay)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()``, again after a backoff while the rules allow.

        Args:
            fn: one attempt; called afresh for each.
            idempotent: repeating the call has the effect of doing it once.
            idempotency_key: the key the request carries so the upstream can
                tell a repeat; makes the call retryable.

        Raises:
            DeadlineExceededError: the deadline passed before an attempt could start.
            RetryBudgetExhaustedError: a retry was due but the budget is spent.
            ConfigurationError: a blank ``idempotency_key``.
            Exception: the last attempt's own error, in every other case.
        """
        check_idempotency_key(idempotency_key)
        may_repeat = idempotent or idempotency_key is not None
        self.stats.calls += 1
        self.budget.record_call(self.clock.monotonic())
        last_error: Exception | None = None
        attempt = 0
        while True:
            deadline = current_deadline()
            if deadline is not None and deadline.expired():
                raise DeadlineExceededError(
                    self._not_started(attempt + 1, deadline)
                ) from last_error
            attempt += 1
            self.stats.attempts += 1
            try:
                return await self._attempt(fn, deadline)
            except Exception as exc:
                remaining = None if deadline is None else deadline.remaining()
                decision = self.decide(
                    attempt,
                    exc,
                    may_repeat=may_repeat,
                    now=self.clock.monotonic(),
                    remaining=remaining,
                )
                if decision.delay is None:
                    reason = decision.reason or StopReason.NOT_RETRYABLE
                    self.stats.stopped[reason] += 1
                    if reason is StopReason.BUDGET_EXHAUSTED:
                        raise RetryBudgetExhaustedError(self._spent(attempt)) from exc
                    self._explain(exc, reason, attempt)
                    raise
                last_error = exc
                delay = decision.delay
            self.stats.retries += 1
            await self.clock.sleep(delay)

    async def _attempt(self, fn: Callable[[], Awaitable[T]], deadline: Deadline | None) -> T:
        per_try = self.settings.per_try_timeout
        if per_try is None:
            return await fn()
        own = Deadline.after(per_try, clock=self.clock, source=f"the per-try timeout {self._on}")
        effective = tighter(deadline, own)
        return await run_within(effective or own, fn)

    @property
    def _on(self) -> str:
        return f"of {self.name!r}" if self.name else "of the retry"

    def _explain(self, error: Exception, reason: StopReason, attempt: int) -> None:
        # A note on the error answers the usual question, "why was this not retried?".
        if reason is StopReason.NOT_IDEMPOTENT:
            error.add_note(
                "wirework: not retried: the call is neither idempotent nor carries an "
                "idempotency key (pass idempotent=True or idempotency_key=...)"
            )
        elif reason is StopReason.ATTEMPTS_EXHAUSTED:
            error.add_note(f"wirework: gave up after {attempt} attempts (max_attempts)")
        elif reason is StopReason.DEADLINE:
            error.add_note("wirework: not retried: the next backoff would end past the deadline")

    def _not_started(self, attempt: int, deadline: Deadline) -> str:
        set_by = f" set by {deadline.source}" if deadline.source else ""
        return f"attempt {attempt} {self._on} was not started: the deadline{set_by} has passed"

    def _spent(self, attempt: int) -> str:
        budget = self.budget
        return (
            f"retry budget {self._on} is spent after attempt {attempt}: retries may add "
            f"{budget.ratio:.0%} to the calls plus {budget.min_per_second:g}/s over "
            f"{budget.window:g}s; the upstream is failing broadly, so this call stops "
            f"rather than add load (raise retry.budget in the policy if this is expected)"
        )
