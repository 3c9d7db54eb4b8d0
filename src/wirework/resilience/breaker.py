"""The circuit breaker: stop calling a target that keeps failing, then probe it.

``Circuit`` is the state machine, with the time passed in; ``CircuitBreaker``
wraps a call with it on an injected clock.

* **closed**: calls go through; their outcomes fill a count-based window of
  the last ``window_size`` calls. The circuit opens when the window holds at
  least ``minimum_calls`` and the failed fraction reaches ``failure_rate``,
  or after ``consecutive_failures`` failures in a row (Linkerd's failure
  accrual), whichever comes first.
* **open**: calls are rejected at once with ``CircuitOpenError``, never
  reaching the target, for ``cooldown`` seconds.
* **half_open**: ``half_open_probes`` calls (one by default) are let through
  and the rest rejected; a probe failure reopens for another cool-down, and
  once every probe has succeeded the circuit closes with an empty window.

Outcomes are tied to the state they were admitted in (an epoch that moves on
every transition), so a slow call admitted while closed that fails after the
circuit opened cannot reopen it, nor pass for the probe. A probe that is
cancelled frees its place for another. State, counters and recent
transitions are readable, and listeners hear each transition
(RELIABILITY.md lesson 8: circuit state must be observable).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.errors import CircuitOpenError, DeadlineExceededError, ResilienceError, WireworkError
from wirework.resilience.settings import CircuitBreakerSettings

T = TypeVar("T")

log = logging.getLogger("wirework.resilience")

_KEPT_TRANSITIONS = 64


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Transition:
    """One change of state; ``at`` is on the circuit's monotonic clock."""

    previous: CircuitState
    state: CircuitState
    at: float
    reason: str


@dataclass(frozen=True)
class Permit:
    """A call let through: report its outcome with it, exactly once."""

    epoch: int
    probe: bool


@dataclass
class CircuitStats:
    """Counts since start. ``calls`` were let through, ``rejections`` were not."""

    calls: int = 0
    successes: int = 0
    failures: int = 0
    rejections: int = 0
    opened: int = 0
    half_opened: int = 0
    closed: int = 0


Listener = Callable[[Transition], None]


class Circuit:
    """The breaker's state machine: every method takes the time, none waits.

    Args:
        settings: window, thresholds, cool-down and probes (defaults if None).
        name: the target, for messages and logs.
    """

    def __init__(self, settings: CircuitBreakerSettings | None = None, *, name: str = "") -> None:
        self.settings = settings or CircuitBreakerSettings()
        self.name = name
        self.stats = CircuitStats()
        self.transitions: deque[Transition] = deque(maxlen=_KEPT_TRANSITIONS)
        self._listeners: list[Listener] = []
        self._state = CircuitState.CLOSED
        self._epoch = 0
        self._window: deque[bool] = deque()  # True: a failure
        self._window_failures = 0
        self._consecutive = 0
        self._open_until = 0.0
        self._open_reason = ""
        self._probes_in_flight = 0
        self._probe_successes = 0

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every transition from now on (an error in it is logged)."""
        self._listeners.append(listener)

    @property
    def state(self) -> CircuitState:
        """The state as last updated; ``poll`` also applies the end of a cool-down."""
        return self._state

    @property
    def window(self) -> tuple[int, int]:
        """(calls, failures) in the closed-state window."""
        return len(self._window), self._window_failures

    def poll(self, now: float) -> CircuitState:
        """The state at ``now``: an open circuit whose cool-down is over turns half-open."""
        if self._state is CircuitState.OPEN and now >= self._open_until:
            self._move(CircuitState.HALF_OPEN, now, "cool-down over")
        return self._state

    def retry_after(self, now: float) -> float:
        """Seconds until probes are let through (0 unless open)."""
        if self.poll(now) is CircuitState.OPEN:
            return self._open_until - now
        return 0.0

    def admit(self, now: float) -> Permit | None:
        """Let a call through (a ``Permit``), or reject it (None, counted)."""
        state = self.poll(now)
        if state is CircuitState.CLOSED:
            self.stats.calls += 1
            return Permit(self._epoch, probe=False)
        if state is CircuitState.HALF_OPEN and (
            self._probes_in_flight + self._probe_successes < self.settings.half_open_probes
        ):
            self._probes_in_flight += 1
            self.stats.calls += 1
            return Permit(self._epoch, probe=True)
        self.stats.rejections += 1
        return None

    def rejection_message(self, now: float) -> str:
        """What a rejected caller is told: the state, why, and when to expect a probe."""
        on = f"circuit {self.name!r}" if self.name else "the circuit"
        if self.poll(now) is CircuitState.OPEN:
            return (
                f"{on} is open ({self._open_reason}); calls fail fast for another "
                f"{self._open_until - now:.2f}s, then {self.settings.half_open_probes} "
                f"probe(s) go through"
            )
        return f"{on} is half-open and its probe is in flight; calls fail fast until it ends"

    def record_success(self, permit: Permit, now: float) -> None:
        """The call let through with ``permit`` succeeded."""
        self.stats.successes += 1
        if permit.epoch != self._epoch:
            return
        if self._state is CircuitState.CLOSED:
            self._consecutive = 0
            self._push(failed=False)
            # A success can still trip: it may be the call that brings the window
            # up to minimum_calls with the failure rate already at the threshold.
            self._trip_if_due(now)
        elif self._state is CircuitState.HALF_OPEN and permit.probe:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.settings.half_open_probes:
                self._move(CircuitState.CLOSED, now, "probe succeeded")

    def record_failure(self, permit: Permit, now: float) -> None:
        """The call let through with ``permit`` failed."""
        self.stats.failures += 1
        if permit.epoch != self._epoch:
            return
        if self._state is CircuitState.CLOSED:
            self._consecutive += 1
            self._push(failed=True)
            self._trip_if_due(now)
        elif self._state is CircuitState.HALF_OPEN and permit.probe:
            self._open(now, "the probe failed")

    def release(self, permit: Permit) -> None:
        """The call ended with no outcome (cancelled, or refused locally): forget it."""
        if permit.epoch == self._epoch and permit.probe:
            self._probes_in_flight -= 1

    def _push(self, *, failed: bool) -> None:
        if len(self._window) == self.settings.window_size and self._window.popleft():
            self._window_failures -= 1
        self._window.append(failed)
        self._window_failures += failed

    def _trip_if_due(self, now: float) -> None:
        settings = self.settings
        limit = settings.consecutive_failures
        if limit is not None and self._consecutive >= limit:
            self._open(now, f"{self._consecutive} consecutive failures")
            return
        calls, failures = self.window
        # Exact division: 7/10 equals the literal 0.7, where 0.7 * 10 does not equal 7.
        if calls >= settings.minimum_calls and failures / calls >= settings.failure_rate:
            self._open(now, f"{failures} of the last {calls} calls failed")

    def _open(self, now: float, reason: str) -> None:
        self._open_until = now + self.settings.cooldown
        self._open_reason = reason
        self._move(CircuitState.OPEN, now, reason)

    def _move(self, state: CircuitState, now: float, reason: str) -> None:
        transition = Transition(self._state, state, now, reason)
        self._state = state
        self._epoch += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state is CircuitState.CLOSED:
            self._window.clear()
            self._window_failures = 0
            self._consecutive = 0
            self.stats.closed += 1
        elif state is CircuitState.OPEN:
            self.stats.opened += 1
        else:
            self.stats.half_opened += 1
        self.transitions.append(transition)
        log.info("circuit %s: %s -> %s (%s)", self.name or "-", transition.previous, state, reason)
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                log.exception("circuit %s: a transition listener failed", self.name or "-")


def counts_as_failure(error: Exception) -> bool:
    """The default: does ``error`` say the target is unwell?

    A timeout does, and so does any error that is not ours (a dropped
    connection, a bug). One of ours with an ``http_status`` below 500 (404,
    409, 429 …) does not: the target answered that request as it should.
    """
    if isinstance(error, WireworkError) and not isinstance(error, DeadlineExceededError):
        return error.http_status >= 500
    return True


class CircuitBreaker:
    """Fail fast while a target keeps failing; let a probe through after a cool-down.

    Args:
        settings: window, thresholds, cool-down and probes (defaults if None).
        clock: where the time is read.
        name: the target, for messages, logs and metrics.
        is_failure: which errors count against the target (``counts_as_failure``
            by default); the others count as successes. Local refusals (an
            inner bulkhead, another breaker) count as neither.
    """

    def __init__(
        self,
        settings: CircuitBreakerSettings | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "",
        is_failure: Callable[[Exception], bool] = counts_as_failure,
    ) -> None:
        self.circuit = Circuit(settings, name=name)
        self.clock = clock
        self.name = name
        self.is_failure = is_failure

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.circuit.state})"

    @property
    def state(self) -> CircuitState:
        """The state now (a finished cool-down shows as half-open)."""
        return self.circuit.poll(self.clock.monotonic())

    @property
    def stats(self) -> CircuitStats:
        return self.circuit.stats

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every transition (for metrics and the CLI)."""
        self.circuit.add_listener(listener)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        /,
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> T:
        """Await ``fn()`` if the circuit lets it through, and record how it ended.

        Raises:
            CircuitOpenError: the circuit is open or its probes are taken; ``fn``
                was not called.
        """
        now = self.clock.monotonic()
        permit = self.circuit.admit(now)
        if permit is None:
            raise CircuitOpenError(
                self.circuit.rejection_message(now), retry_after=self.circuit.retry_after(now)
            )
        try:
            result = await fn()
        except Exception as exc:
            self._record(permit, exc)
            raise
        except BaseException:
            self.circuit.release(permit)
            raise
        self.circuit.record_success(permit, self.clock.monotonic())
        return result

    def _record(self, permit: Permit, error: Exception) -> None:
        if isinstance(error, ResilienceError) and not isinstance(error, DeadlineExceededError):
            self.circuit.release(permit)
            return
        try:
            failed = self.is_failure(error)
        except Exception:
            # Every permit must be settled: a lost probe would hold the circuit half-open.
            log.exception("circuit %s: is_failure raised; counting a failure", self.name or "-")
            failed = True
        if failed:
            self.circuit.record_failure(permit, self.clock.monotonic())
        else:
            self.circuit.record_success(permit, self.clock.monotonic())
