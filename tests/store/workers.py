"""The store fault tests' worker processes (``tests.helpers.store_worker``), reaped at the end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from tests.helpers.harness import Worker, spawn
from tests.helpers.store_worker import TOPIC
from tests.store import brokers
from wirework.brokers import Broker
from wirework.store import Store, StoreBusyError
from wirework.testing.ledger import History, LedgerFile, Record

_SCRUBBED = ("FAULT_POINT", "FAULT_EVERY")

#: The workers' effects table: no unique constraint, so a broken inbox cannot hide.
EFFECTS = "CREATE TABLE effects (message_id TEXT NOT NULL, process TEXT NOT NULL)"


def polling(check: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    """``check`` as a ``wait_until`` condition that reads a store the workers write to: while
    they keep the SQLite write lock past ``busy_timeout`` (a loaded machine), it is not yet
    true, and the next poll asks again."""

    async def poll() -> bool:
        try:
            return await check()
        except StoreBusyError:
            return False

    return poll


async def effects(store: Store) -> Counter[str]:
    """Effect rows per message id."""
    async with store.transaction() as tx:
        rows = await tx.fetch("SELECT message_id FROM effects")
    return Counter(row["message_id"] for row in rows)


async def backlog(broker: Broker) -> int:
    """Messages of the workers' topic not yet acked by every group (or waiting for one)."""
    return await brokers.backlog(broker, TOPIC)


class StoreRun:
    """A broker, a ledger directory and the worker processes of one test.

    ``broker_url`` defaults to a SQLite file under ``root``.
    """

    def __init__(self, root: Path, store_url: str, broker_url: str | None = None) -> None:
        self.store_url = store_url
        self.broker_url = broker_url or f"sqlite:///{root}/broker.db"
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
            "--broker",
            self.broker_url,
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


class MemoryLedger(LedgerFile):
    """A ledger held in memory, for tests whose clients all run in the test's own process.

    Nothing there can be killed between two records, so nothing needs the
    fsync a ``LedgerFile`` pays per record (about 4 ms on the CI machine,
    which in-process drains of a thousand deliveries would spend mostly on).
    """

    def __init__(self, process: str = "test") -> None:
        self.path = Path(f"<memory:{process}>")
        self._fd = None
        self.process = process
        self.records: list[Record] = []

    def record(self, kind: str, message_id: str, **fields: object) -> float:
        at = time.monotonic()
        shown = {name: str(value) for name, value in fields.items()}
        self.records.append(Record(self.process, kind, message_id, at, shown))
        return at

    def history(self) -> History:
        return History(tuple(self.records))
