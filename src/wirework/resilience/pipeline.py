"""``Pipeline``: policies composed around one call, the first given outermost.

The order wirework builds, and the one to use unless you have a reason::

    Pipeline(Fallback(...), Timeout(2), Retry(...), CircuitBreaker(...), Bulkhead(...))

* **Fallback** outermost: it replaces whatever the rest ends with, a passed
  deadline or an open circuit included.
* **Timeout** around Retry: the deadline bounds the whole call, every
  attempt and every backoff sleep, and Retry reads it so that it never
  sleeps past it nor starts an attempt after it. A limit per attempt is
  ``RetrySettings.per_try_timeout``.
* **Retry** around CircuitBreaker: every attempt passes the breaker and is
  counted by it; once it opens, the next attempt gets ``CircuitOpenError``,
  which Retry never retries, so an open breaker ends the call at once
  instead of being hammered.
* **CircuitBreaker** around Bulkhead: a call the breaker rejects never takes
  or waits for a slot, and a bulkhead refusal is a local matter the breaker
  counts as neither success nor failure.
* **Bulkhead** innermost: it limits what really reaches the target, and an
  attempt holds its slot only while it runs, not during backoff.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.resilience.breaker import CircuitBreaker, counts_as_failure
from wirework.resilience.bulkhead import Bulkhead
from wirework.resilience.deadline import Timeout
from wirework.resilience.retry import Retry, check_idempotency_key
from wirework.resilience.settings import PolicySet, TargetPolicies

T = TypeVar("T")
P = TypeVar("P")


class Policy(Protocol):
    """Anything that can run a call: each policy, and a ``Pipeline`` of them."""

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()`` under this policy; the flags say if repeating it is safe."""
        ...


class Pipeline:
    """Policies around a call, ``policies[0]`` outermost (see the module docstring for order).

    Args:
        policies: the policies, outermost first.
        name: the target, for logs and the CLI.
    """

    def __init__(self, *policies: Policy, name: str = "") -> None:
        self.policies = policies
        self.name = name

    def __repr__(self) -> str:
        inner = ", ".join(repr(policy) for policy in self.policies)
        return f"Pipeline({inner})"

    @classmethod
    def from_settings(
        cls,
        settings: TargetPolicies,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
        retry_if: Callable[[Exception], bool] | None = None,
        is_failure: Callable[[Exception], bool] = counts_as_failure,
        rng: random.Random | None = None,
    ) -> Pipeline:
        """The pipeline one target's settings describe, in the documented order.

        Build it once per target and keep it: the retry budget, the breaker's
        window and the bulkhead's slots are shared by the calls through it.
        """
        policies: list[Policy] = [Timeout(settings.timeout, clock=clock, name=name)]
        if settings.retry is not None:
            policies.append(
                Retry(settings.retry, clock=clock, name=name, retry_if=retry_if, rng=rng)
            )
        if settings.circuit_breaker is not None:
            policies.append(
                CircuitBreaker(
                    settings.circuit_breaker, clock=clock, name=name, is_failure=is_failure
                )
            )
        if settings.bulkhead is not None:
            policies.append(Bulkhead(settings.bulkhead, name=name))
        return cls(*policies, name=name)

    def find(self, kind: type[P]) -> P | None:
        """The first policy of type ``kind`` (e.g. the ``CircuitBreaker``, to read its state)."""
        for policy in self.policies:
            if isinstance(policy, kind):
                return policy
            if isinstance(policy, Pipeline):
                found = policy.find(kind)
                if found is not None:
                    return found
        return None

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()`` through every policy.

        Args:
            fn: the call itself, with no arguments; called afresh on each attempt.
            idempotent: repeating it has the effect of doing it once (GET, PUT …).
            idempotency_key: the key the request carries so the target can tell
                a repeat; makes a non-idempotent call retryable.

        Raises:
            Whatever the call or a policy raises (``ResilienceError`` subclasses
            for the policies' own refusals).
        """
        check_idempotency_key(idempotency_key)
        run = fn
        for policy in reversed(self.policies):
            run = _around(policy, run, idempotent, idempotency_key)
        return await run()


def _around(
    policy: Policy,
    inner: Callable[[], Awaitable[T]],
    idempotent: bool,
    idempotency_key: str | None,
) -> Callable[[], Awaitable[T]]:
    def run() -> Awaitable[T]:
        return policy.call(inner, idempotent=idempotent, idempotency_key=idempotency_key)

    return run


def build_pipelines(
    policy_set: PolicySet,
    *,
    clock: Clock = SYSTEM_CLOCK,
    retry_if: Callable[[Exception], bool] | None = None,
    is_failure: Callable[[Exception], bool] = counts_as_failure,
) -> dict[str, Pipeline]:
    """One ``Pipeline`` per target of ``policy_set``, keyed by target name."""
    return {
        target: Pipeline.from_settings(
            policy_set[target], name=target, clock=clock, retry_if=retry_if, is_failure=is_failure
        )
        for target in policy_set.targets()
    }
