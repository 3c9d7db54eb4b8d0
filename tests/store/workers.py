"""The store fault tests' worker processes (``tests.helpers.store_worker``), reaped at the end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.harness import Worker, spawn
from tests.helpers.store_worker import TOPIC
from wirework.brokers.sqlite import SqliteBroker
from wirework.store import Store
from wirework.testing.ledger import History

_SCRUBBED = ("FAULT_POINT", "FAULT_EVERY")

#: The workers' effects table: no unique constraint, so a broken inbox cannot hide.
EFFECTS = "CREATE TABLE effects (message_id TEXT NOT NULL, process TEXT NOT NULL)"


async def effects(store: Store) -> Counter[str]:
    """Effect rows per message id."""
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT message_id FROM effects")
    return Counter(row["message_id"] for row in rows)


async def backlog(broker: SqliteBroker) -> int:
    """Messages of the workers' topic not yet acked by every group (or waiting for one)."""
    return sum(row.backlog for row in await broker.stats() if row.topic == TOPIC)


class StoreRun:
    """A broker file, a ledger directory and the worker processes of one test."""

    def __init__(self, root: Path, store_url: str) -> None:
        self.store_url = store_url
        self.broker_db = root / "broker.db"
        self.ledger = root / "ledger"
        self.logs = root / "logs"
        self.ledger.mkdir()
        self.logs.mkdir()
        self.workers: list[Worker] = []

    def start(
        self,
        command: str,
        name: str,
        options: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
    ) -> Worker:
        environment = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED and not k.startswith("WIREWORK_")
        }
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        argv = [
            sys.executable,
            "-m",
            "tests.helpers.store_worker",
            command,
            "--store",
            self.store_url,
            "--broker-db",
            str(self.broker_db),
            "--ledger",
            str(self.ledger),
            "--name",
            name,
            *options,
        ]
        worker = spawn(name, argv, environment, self.logs / f"{name}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def history(self) -> History:
        return History.read(self.ledger)

    def started(self, worker: Worker) -> bool:
        return bool(self.history().of("started", process=f"{worker.name}.{worker.pid}"))

    def describe(self) -> str:
        parts = []
        for worker in self.workers:
            parts.append(f"--- {worker.name} pid={worker.pid} rc={worker.returncode}")
            parts.append(worker.output(15))
        return "\n".join(parts)

    def kill_all(self) -> None:
        for worker in self.workers:
            worker.kill()
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=10)
