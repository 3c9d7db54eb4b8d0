"""Resilience policies: timeout, retry, circuit breaker, bulkhead, fallback, and their order.

Each policy is a small object with one async method,
``await policy.call(fn, idempotent=..., idempotency_key=...)``; the logic
that decides (backoff, retry budget, breaker states) is plain code that takes
the time as an argument, and every wait runs on an injectable
``wirework.clock.Clock``. A ``Pipeline`` composes them, outermost first, in
the order its module documents::

    payments = Pipeline(
        Timeout(2),
        Retry(RetrySettings(max_attempts=3)),
        CircuitBreaker(CircuitBreakerSettings(), name="payments"),
        Bulkhead(BulkheadSettings(max_concurrent=20, max_queued=20)),
    )
    receipt = await payments.call(lambda: charge(order), idempotency_key=order.id)

Build one pipeline per target and keep it: its retry budget, breaker window
and bulkhead slots are shared by every call to that target. The deadline of
the current call is ``current_deadline()``; ``carriers`` writes and reads it
on HTTP, gRPC and messaging.

The policy file (``load_policies``), shared with the sidecar: a mapping of
target names (letters, digits, ``_ . -``) to that target's policies. Every
field is optional and shows its default below; a policy left out is not
used, except ``timeout``, which always applies. Durations are seconds.
Unknown fields, strings for numbers and duplicate keys are errors::

    payments:
      timeout: 10.0              # the whole call, retries and backoff included
      retry:
        max_attempts: 3          # attempts in all, the first included
        base_delay: 0.05         # first backoff drawn from [0, 0.05], doubling per retry
        max_delay: 2.0           # no backoff is longer
        per_try_timeout: null    # a deadline per attempt (cut attempts may be retried)
        budget:                  # shared by all calls to the target
          ratio: 0.2             # retries may add 20 % to the calls ...
          min_per_second: 10.0   # ... plus 10 retries per second ...
          window: 10.0           # ... counted over the last 10 s
      circuit_breaker:
        window_size: 20          # outcomes of the last 20 calls
        minimum_calls: 10        # no rate-based trip before 10 calls in the window
        failure_rate: 0.5        # open when half of the window failed ...
        consecutive_failures: 7  # ... or after 7 failures in a row (null: off)
        cooldown: 5.0            # open this long, then half-open
        half_open_probes: 1      # calls let through half-open; all must succeed
      bulkhead:
        max_concurrent: 100      # calls in flight
        max_queued: 100          # calls waiting for a slot; more are rejected

Only calls the caller marks ``idempotent=True`` or gives an
``idempotency_key`` are ever retried; see ``retry`` for every rule.
docs/resilience.md walks through a whole file and the errors.
"""

from wirework.resilience.breaker import Circuit as Circuit
from wirework.resilience.breaker import CircuitBreaker as CircuitBreaker
from wirework.resilience.breaker import CircuitState as CircuitState
from wirework.resilience.breaker import CircuitStats as CircuitStats
from wirework.resilience.breaker import Transition as Transition
from wirework.resilience.breaker import counts_as_failure as counts_as_failure
from wirework.resilience.bulkhead import Bulkhead as Bulkhead
from wirework.resilience.carriers import DEADLINE_EXTENSION as DEADLINE_EXTENSION
from wirework.resilience.carriers import HTTP_DEADLINE_HEADER as HTTP_DEADLINE_HEADER
from wirework.resilience.carriers import deadline_extension as deadline_extension
from wirework.resilience.carriers import deadline_from_grpc as deadline_from_grpc
from wirework.resilience.carriers import deadline_header as deadline_header
from wirework.resilience.carriers import grpc_timeout as grpc_timeout
from wirework.resilience.carriers import parse_deadline_extension as parse_deadline_extension
from wirework.resilience.carriers import parse_deadline_header as parse_deadline_header
from wirework.resilience.deadline import Deadline as Deadline
from wirework.resilience.deadline import Timeout as Timeout
from wirework.resilience.deadline import current_deadline as current_deadline
from wirework.resilience.deadline import deadline_scope as deadline_scope
from wirework.resilience.deadline import run_within as run_within
from wirework.resilience.fallback import Fallback as Fallback
from wirework.resilience.loading import load_policies as load_policies
from wirework.resilience.pipeline import Pipeline as Pipeline
from wirework.resilience.pipeline import Policy as Policy
from wirework.resilience.pipeline import build_pipelines as build_pipelines
from wirework.resilience.retry import Retry as Retry
from wirework.resilience.retry import StopReason as StopReason
from wirework.resilience.retry import is_idempotent_method as is_idempotent_method
from wirework.resilience.settings import BulkheadSettings as BulkheadSettings
from wirework.resilience.settings import CircuitBreakerSettings as CircuitBreakerSettings
from wirework.resilience.settings import PolicySet as PolicySet
from wirework.resilience.settings import RetryBudgetSettings as RetryBudgetSettings
from wirework.resilience.settings import RetrySettings as RetrySettings
from wirework.resilience.settings import TargetPolicies as TargetPolicies

__all__ = [
    "DEADLINE_EXTENSION",
    "HTTP_DEADLINE_HEADER",
    "Bulkhead",
    "BulkheadSettings",
    "Circuit",
    "CircuitBreaker",
    "CircuitBreakerSettings",
    "CircuitState",
    "CircuitStats",
    "Deadline",
    "Fallback",
    "Pipeline",
    "Policy",
    "PolicySet",
    "Retry",
    "RetryBudgetSettings",
    "RetrySettings",
    "StopReason",
    "TargetPolicies",
    "Timeout",
    "Transition",
    "build_pipelines",
    "counts_as_failure",
    "current_deadline",
    "deadline_extension",
    "deadline_from_grpc",
    "deadline_header",
    "deadline_scope",
    "grpc_timeout",
    "is_idempotent_method",
    "load_policies",
    "parse_deadline_extension",
    "parse_deadline_header",
    "run_within",
]
