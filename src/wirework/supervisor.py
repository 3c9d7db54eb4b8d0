"""Supervising worker processes for ``wirework run --workers N``.

``Supervisor`` starts N copies of a command (``wirework run ... --worker-of
PID``), forwards SIGTERM to them, and restarts any that dies while it is not
stopping, with backoff, because a dead worker must not quietly reduce
capacity. Children get their own session, so a Ctrl-C in the terminal reaches
only the parent and every child sees exactly the signals it forwards; children
watch the parent's pid and stop if it disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wirework.consumer import RetryPolicy
from wirework.errors import ConfigurationError
from wirework.runner import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FORCED,
    EXIT_OK,
    KILL_MARGIN,
    STOP_SIGNALS,
)

log = logging.getLogger("wirework.run")


@dataclass
class RestartBackoff:
    """How long to wait before restarting a worker that died.

    Consecutive quick deaths back off exponentially (the broker may be down,
    and a crash loop must not burn a CPU); a worker that stayed up for
    ``healthy_after`` seconds starts the count again.
    """

    policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            max_attempts=1_000_000, base_delay=0.5, multiplier=2.0, max_delay=30.0, jitter=0.2
        )
    )
    healthy_after: float = 30.0
    failures: int = 0

    def delay(self, uptime: float, rng: random.Random) -> float:
        """Seconds to wait after a worker that ran ``uptime`` seconds died."""
        if uptime >= self.healthy_after:
            self.failures = 0
        self.failures += 1
        return self.policy.delay_for(self.failures, rng)


class Supervisor:
    """Keeps ``workers`` copies of a command running until a signal; see the module docs.

    Args:
        command: the argv of worker number ``index`` (1-based).
        workers: how many to keep running.
        grace: what each worker gives its handlers; the supervisor waits
            ``grace + KILL_MARGIN`` before it kills a worker that has not exited.
        rng: jitter for restart delays.
    """

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        *,
        workers: int,
        grace: float = 5.0,
        backoff: Callable[[], RestartBackoff] = RestartBackoff,
        rng: random.Random | None = None,
        handle_signals: bool = True,
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"workers must be at least 1, got {workers}")
        self.command = command
        self.workers = workers
        self.grace = grace
        self.handle_signals = handle_signals
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._codes: dict[int, int] = {}
        self._stop = asyncio.Event()
        self._signals = 0
        self._forced = False
        self._config_error = False

    async def run(self) -> int:
        """Run the workers until stopped; 0 only if every worker's last exit was 0."""
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("supervising %d workers from pid %d", self.workers, os.getpid())
        try:
            async with asyncio.TaskGroup() as tasks:
                slots = [
                    tasks.create_task(self._keep(index), name=f"worker {index}")
                    for index in range(1, self.workers + 1)
                ]
                await self._stop.wait()
                _, late = await asyncio.wait(slots, timeout=self.grace + KILL_MARGIN)
                if late:
                    self._kill_all(f"did not stop within grace + {KILL_MARGIN:.1f} s")
        finally:
            if self.handle_signals:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
            self._kill_all("the supervisor is exiting")
        code = self._exit_code()
        log.info("all workers stopped (exit %d)", code)
        return code

    def stop(self) -> None:
        """Stop every worker gracefully (forward SIGTERM) and restart none."""
        self._stop.set()
        for proc in list(self._procs.values()):
            _send(proc, signal.SIGTERM)

    def _exit_code(self) -> int:
        if self._forced:
            return EXIT_FORCED
        if self._config_error:
            return EXIT_CONFIG
        clean = len(self._codes) == self.workers and all(c == 0 for c in self._codes.values())
        return EXIT_OK if clean else EXIT_FAILED

    async def _keep(self, index: int) -> None:
        backoff = self._backoff()
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                *self.command(index), start_new_session=True
            )
            self._procs[index] = proc
            if self._stop.is_set():  # a signal arrived while it was starting
                _send(proc, signal.SIGTERM)
            started = loop.time()
            log.info("worker %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            del self._procs[index]
            uptime = loop.time() - started
            if self._stop.is_set():
                # Killed by the forwarded SIGTERM before it installed its handler:
                # it had started no service, so nothing was in flight.
                self._codes[index] = 0 if code == -signal.SIGTERM else code
                log.info("worker %d (pid %d) %s", index, proc.pid, _exit_text(code))
                return
            if code == EXIT_CONFIG:
                log.error(
                    "worker %d (pid %d) stopped on a configuration error; a restart cannot fix "
                    "that, so all workers stop",
                    index,
                    proc.pid,
                )
                self._codes[index] = code
                self._config_error = True
                self.stop()
                return
            delay = backoff.delay(uptime, self._rng)
            log.error(
                "WORKER DIED: worker %d (pid %d) %s after %.1f s, unasked; capacity is down "
                "by one until it restarts in %.1f s",
                index,
                proc.pid,
                _exit_text(code),
                uptime,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("%s: stopping %d worker(s), grace %.1f s", name, len(self._procs), self.grace)
            self.stop()
        elif self._signals == 2:
            log.warning("%s again: forcing the workers to stop", name)
            self._forced = True
            for proc in list(self._procs.values()):
                _send(proc, signal.SIGTERM)
        else:
            self._forced = True
            self._kill_all(f"third signal, {name}")

    def _kill_all(self, why: str) -> None:
        for index, proc in list(self._procs.items()):
            if proc.returncode is None:
                log.error("killing worker %d (pid %d): %s", index, proc.pid, why)
                _send(proc, signal.SIGKILL)


def _send(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
