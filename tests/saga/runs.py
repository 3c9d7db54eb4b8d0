"""The saga fault tests' world: a store, a ledger directory, orchestrator processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.helpers.harness import Worker, spawn
from wirework.saga.state import TERMINAL
from wirework.store import Store
from wirework.testing.ledger import History

_SCRUBBED = ("FAULT_POINT", "FAULT_EVERY")


class SagaRun:
    """Orchestrator processes (``tests.helpers.saga_worker``) of one test, reaped at the end."""

    def __init__(self, root: Path, store_url: str) -> None:
        self.store_url = store_url
        self.ledger = root / "ledger"
        self.logs = root / "logs"
        self.ledger.mkdir()
        self.logs.mkdir()
        self.workers: list[Worker] = []

    def start(
        self,
        name: str,
        *,
        point: str | None = None,
        every: int = 1,
        lease: float = 1.0,
        max_sagas: int = 20,
    ) -> Worker:
        environment = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED and not k.startswith("WIREWORK_")
        }
        environment["PYTHONUNBUFFERED"] = "1"
        if point is not None:
            environment.update({"FAULT_POINT": point, "FAULT_EVERY": str(every)})
        argv = [
            sys.executable,
            "-m",
            "tests.helpers.saga_worker",
            "--store",
            self.store_url,
            "--ledger",
            str(self.ledger),
            "--name",
            name,
            f"--lease={lease}",
            "--poll=0.2",
            f"--max-sagas={max_sagas}",
        ]
        worker = spawn(name, argv, environment, self.logs / f"{name}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def history(self) -> History:
        return History.read(self.ledger)

    def describe(self) -> str:
        parts = []
        for worker in self.workers[-6:]:
            parts.append(f"--- {worker.name} pid={worker.pid} rc={worker.returncode}")
            parts.append(worker.output(15))
        return "\n".join(parts)

    def kill_all(self) -> None:
        for worker in self.workers:
            worker.kill()
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=10)


async def statuses(store: Store) -> dict[str, str]:
    """Every saga's status, by id."""
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT saga_id, status FROM wirework_saga")
    return {row["saga_id"]: row["status"] for row in rows}


class Terminal:
    """``await ended()``: whether every saga of ``saga_ids`` is terminal, asked of the store at
    most every ``every`` seconds (each ask takes the SQLite write lock the workers need)."""

    def __init__(self, store: Store, saga_ids: set[str], *, every: float = 0.5) -> None:
        self.store = store
        self.saga_ids = saga_ids
        self.every = every
        self._asked = float("-inf")

    async def __call__(self) -> bool:
        loop = asyncio.get_running_loop()
        if loop.time() - self._asked < self.every:
            return False
        self._asked = loop.time()
        found = await statuses(self.store)
        return all(found.get(saga_id) in TERMINAL for saga_id in self.saga_ids)


def overlaps(history: History) -> list[str]:
    """Sagas whose actions ran in two processes at overlapping times (from enter/leave)."""
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    open_: dict[tuple[str, str], float] = {}
    for record in history.of("enter", "leave"):
        saga_id = record.id.split("/", 1)[0]
        key = (record.process, record.id)
        if record.kind == "enter":
            open_[key] = record.at
        elif key in open_:
            spans[saga_id].append((open_.pop(key), record.at, record.process))
    found = []
    for saga_id, intervals in spans.items():
        intervals.sort()
        reach, holder = float("-inf"), ""
        for start, end, process in intervals:
            if start < reach and process != holder:
                found.append(f"{saga_id}: {holder} until {reach} and {process} from {start}")
            if end > reach:
                reach, holder = end, process
    return found
