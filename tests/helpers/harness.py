"""One fault test's world: a broker file, a ledger directory, worker processes, an observer.

Workers are real processes (``python -m tests.helpers.ledger_worker``) so a
``kill -9`` is a real one. ``FaultRun.kill_all`` kills and reaps every worker
a test started, and the fixture calls it even when the test fails. Every wait
has a deadline and says what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tests.helpers.ledger_worker import GROUP, TOPIC
from wirework.brokers.base import GroupStats
from wirework.brokers.sqlite import SqliteBroker
from wirework.testing.conformance import wait_until
from wirework.testing.ledger import History, LedgerCheck, drain

REPO = Path(__file__).resolve().parents[2]

#: Lease used by every fault test (RELIABILITY.md §2.0 asks for ack_wait = 1 s).
LEASE = 1.0

#: Crash tests repeat with three seeds (RELIABILITY.md §2.0).
SEEDS = (1, 2, 3)

#: Hard deadline of a drain phase, far above what a passing run needs.
DRAIN_TIMEOUT = 45.0

_POLL = 0.02
_SCRUBBED = ("FAULT_POINT", "FAULT_EVERY")


class Worker:
    """One worker process and its combined stdout/stderr log."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind runs in the worker."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)

    async def exited(self, timeout: float) -> int:
        """Wait for the process to end; its return code (``-9`` after ``kill``)."""
        await wait_until(lambda: not self.alive, timeout, what=f"worker {self.name} to exit")
        code = self.returncode
        assert code is not None
        return code

    def output(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], environment: dict[str, str], log: Path) -> Worker:
    """Start a worker process in a session of its own, its output in ``log``."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(name, process, log)


class FaultRun:
    """The broker file, ledger directory and worker processes of one test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "broker.db"
        self.ledger = root / "ledger"
        self.logs = root / "logs"
        self.ledger.mkdir()
        self.logs.mkdir()
        self.workers: list[Worker] = []
        self.observer = SqliteBroker(self.db)
        """The test's own view of the file: stats and dead letters, never a consumer."""

    # -- starting workers ---------------------------------------------------------

    def start(
        self,
        command: str,
        name: str,
        options: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
    ) -> Worker:
        environment = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        environment = {k: v for k, v in environment.items() if not k.startswith("WIREWORK_")}
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        argv = [
            sys.executable,
            "-m",
            "tests.helpers.ledger_worker",
            command,
            "--db",
            str(self.db),
            "--ledger",
            str(self.ledger),
            "--name",
            name,
            *options,
        ]
        worker = spawn(name, argv, environment, self.logs / f"{name}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def publisher(
        self,
        name: str,
        *,
        count: int,
        rate: float = 0.0,
        tasks: int = 1,
        duration: float = 0.0,
        busy_timeout: float = 5.0,
        fault_point: str | None = None,
        fault_every: int = 1,
    ) -> Worker:
        options = [
            f"--count={count}",
            f"--rate={rate}",
            f"--tasks={tasks}",
            f"--duration={duration}",
            f"--busy-timeout={busy_timeout}",
        ]
        env = {"FAULT_POINT": fault_point, "FAULT_EVERY": str(fault_every)} if fault_point else {}
        return self.start("publish", name, options, env=env)

    def consumer(
        self,
        name: str,
        *,
        lease: float = LEASE,
        prefetch: int = 10,
        concurrency: int = 1,
        handler_sleep: float = 0.0,
        block_after: int = -1,
        poison: Iterable[str] = (),
        max_attempts: int = 5,
        base_delay: float = 0.1,
        grace: float = 5.0,
        busy_timeout: float = 5.0,
        fault_point: str | None = None,
        fault_every: int = 1,
    ) -> Worker:
        options = [
            f"--lease={lease}",
            f"--prefetch={prefetch}",
            f"--concurrency={concurrency}",
            f"--handler-sleep={handler_sleep}",
            f"--block-after={block_after}",
            f"--poison={','.join(poison)}",
            f"--max-attempts={max_attempts}",
            f"--base-delay={base_delay}",
            f"--grace={grace}",
            f"--busy-timeout={busy_timeout}",
        ]
        env = {"FAULT_POINT": fault_point, "FAULT_EVERY": str(fault_every)} if fault_point else {}
        return self.start("consume", name, options, env=env)

    def locker(self, name: str, *, hold: float) -> Worker:
        return self.start("lock", name, [f"--hold={hold}"])

    # -- observing ----------------------------------------------------------------

    def history(self) -> History:
        return History.read(self.ledger)

    def records_of(self, worker: Worker, *kinds: str) -> list[float]:
        """Times of one worker's records of these kinds."""
        process = f"{worker.name}.{worker.pid}"
        return [r.at for r in self.history().of(*kinds, process=process)]

    def ids_of(self, worker: Worker, kind: str) -> set[str]:
        return self.history().ids(kind, process=f"{worker.name}.{worker.pid}")

    async def stats(self) -> GroupStats:
        """The ledger group's row of ``broker.stats()``."""
        for row in await self.observer.stats():
            if row.topic == TOPIC and row.group == GROUP:
                return row
        return GroupStats(
            topic=TOPIC, group=GROUP, ready=0, delayed=0, in_flight=0, dead_lettered=0
        )

    async def drain(
        self, *, quiet: float = 2 * LEASE, timeout: float = DRAIN_TIMEOUT
    ) -> LedgerCheck:
        """The drain phase: every acked id effected or dead-lettered and the group empty,
        or no invocation for ``quiet`` seconds, or the deadline."""

        async def idle() -> bool:
            return (await self.stats()).backlog == 0

        return await drain(
            self.ledger,
            self.observer,
            quiet=quiet,
            timeout=timeout,
            topic=TOPIC,
            group=GROUP,
            idle=idle,
        )

    def describe(self) -> str:
        """Every worker's exit code and the tail of its output, for failure messages."""
        parts = []
        for worker in self.workers:
            parts.append(f"--- {worker.name} pid={worker.pid} rc={worker.returncode}")
            parts.append(worker.output(15))
        return "\n".join(parts)

    # -- cleanup ------------------------------------------------------------------

    def kill_all(self) -> None:
        """Kill and reap every worker this run started."""
        for worker in self.workers:
            worker.kill()
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a kill -9 does not hang
                worker.process.wait(timeout=10)

    async def aclose(self) -> None:
        self.kill_all()
        await self.observer.aclose()


class Supervisor:
    """Keeps one worker per name alive, restarting whichever exits, until ``stop``.

    ``exits`` lists every worker that ended on its own, with its return code.
    """

    def __init__(
        self, start: Callable[[str], Worker], names: Sequence[str], *, max_restarts: int = 100
    ) -> None:
        self._start = start
        self._names = names
        self._max_restarts = max_restarts
        self._stopped = asyncio.Event()
        self.current: dict[str, Worker] = {}
        self.exits: list[tuple[Worker, int]] = []

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        while not self._stopped.is_set():
            for name in self._names:
                worker = self.current.get(name)
                if worker is not None and worker.alive:
                    continue
                if worker is not None:
                    code = worker.returncode
                    assert code is not None
                    self.exits.append((worker, code))
                if len(self.exits) >= self._max_restarts:
                    return  # a worker that cannot stay up: the drain will say what was lost
                self.current[name] = self._start(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), _POLL)


def report(test: str, result: LedgerCheck, **measured: float | int) -> None:
    """Print the ledger counts (and measurements) of a run; ``pytest -rP`` shows them."""
    extra = " ".join(f"{name}={_show(value)}" for name, value in measured.items())
    print(f"LEDGER {test}: {result}" + (f" | {extra}" if extra else ""))


def _show(value: float | int) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
