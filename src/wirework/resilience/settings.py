"""The policy settings: one pydantic model per policy, and ``PolicySet`` keyed by target.

These models are the YAML schema (documented in ``wirework.resilience`` and
docs/resilience.md) and the settings objects the policies take in code. They
are strict (``"3"`` is not a number, ``true`` is not 1) and refuse unknown
fields, so a typo in a policy file is an error, not a silently ignored line.
All durations are seconds as numbers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints, model_validator

Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A duration in seconds: positive and finite."""

TargetName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=200)
]
"""A target's name: a service or upstream, as the clients and the sidecar name it."""

_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True)


class RetryBudgetSettings(BaseModel):
    """How many retries all calls to one target may add (Linkerd's defaults)."""

    model_config = _MODEL

    ratio: float = Field(default=0.2, ge=0, allow_inf_nan=False)
    """Retries allowed per call in the window: 0.2 lets retries add 20 % load."""
    min_per_second: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    """Retries per second allowed on top of ``ratio``, so a quiet target can retry."""
    window: Seconds = 10.0
    """The sliding window the calls and retries are counted over."""


class RetrySettings(BaseModel):
    """Retry with exponential backoff and full jitter, within the retry budget."""

    model_config = _MODEL

    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts in all, the first included (1: never retry)."""
    base_delay: float = Field(default=0.05, ge=0, allow_inf_nan=False)
    """The ceiling of the first backoff delay; each retry doubles it."""
    max_delay: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    """The cap on any backoff delay."""
    per_try_timeout: Seconds | None = None
    """A deadline per attempt; an attempt it cuts may be retried (Envoy's per_try_timeout)."""
    budget: RetryBudgetSettings = RetryBudgetSettings()
    """The retry budget shared by all calls to the target. Always on."""


class CircuitBreakerSettings(BaseModel):
    """A circuit breaker over the outcomes of the last ``window_size`` calls."""

    model_config = _MODEL

    window_size: int = Field(default=20, ge=1)
    """How many of the latest calls the failure rate is computed over."""
    minimum_calls: int = Field(default=10, ge=1)
    """No failure-rate trip until the window holds this many calls."""
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    """Open when this fraction of the window failed (0.5: half)."""
    consecutive_failures: int | None = Field(default=7, ge=1)
    """Also open after this many failures in a row (Linkerd's 7); null: rate only."""
    cooldown: Seconds = 5.0
    """How long the circuit stays open before probes are let through."""
    half_open_probes: int = Field(default=1, ge=1)
    """Probe calls let through after the cool-down; all must succeed to close."""

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> CircuitBreakerSettings:
        if self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) is larger than window_size "
                f"({self.window_size}), so the failure rate could never trip the breaker"
            )
        return self


class BulkheadSettings(BaseModel):
    """A limit on calls in flight to a target, with a bounded queue for the overflow."""

    model_config = _MODEL

    max_concurrent: int = Field(default=100, ge=1)
    """Calls in flight at once."""
    max_queued: int = Field(default=100, ge=0)
    """Calls waiting for a slot; past this a call is rejected at once (0: no queue)."""


class TargetPolicies(BaseModel):
    """Everything that applies to calls to one target. Absent policies are not used."""

    model_config = _MODEL

    timeout: Seconds = 10.0
    """The whole call, retries and backoff included. Always set: no infinite default."""
    retry: RetrySettings | None = None
    circuit_breaker: CircuitBreakerSettings | None = None
    bulkhead: BulkheadSettings | None = None


class PolicySet(RootModel[dict[TargetName, TargetPolicies]]):
    """Policies by target name: the top level of a policy file."""

    model_config = ConfigDict(frozen=True, strict=True)

    def __getitem__(self, target: str) -> TargetPolicies:
        return self.root[target]

    def __contains__(self, target: object) -> bool:
        return target in self.root

    def targets(self) -> list[str]:
        """The target names, sorted."""
        return sorted(self.root)
