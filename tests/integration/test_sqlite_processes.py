"""The SQLite broker across real processes: one file, several consumers and groups."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from wirework.brokers import connect
from wirework.brokers.sqlite import SqliteBroker
from wirework.envelope import Envelope, encode_binary
from wirework.testing.conformance import wait_until

WORKER = Path(__file__).with_name("sqlite_worker.py")
ROOT = Path(__file__).resolve().parents[2]


class Item(BaseModel):
    n: int


class Workers:
    """Starts worker processes and always kills them, even when the test fails."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, topic: str, group: str, out: Path, poll: float = 1.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(self.db), topic, group, str(out), str(poll)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the worker has subscribed
        assert line.strip() == "ready", f"worker did not start: {line!r}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path / "broker.db")
    try:
        yield pool
    finally:
        pool.stop()


def read_ids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


async def publish(db: Path, topic: str, numbers: range) -> None:
    async with connect(f"sqlite:///{db}") as broker:
        for n in numbers:
            await broker.publish(topic, encode_binary(Envelope.new("item", Item(n=n), source="/t")))


async def test_competing_consumers_and_fan_out_across_processes(
    workers: Workers, tmp_path: Path
) -> None:
    """Two processes share one group's messages exactly once; a third process's group gets all."""
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    workers.start("jobs", "pool", a)
    workers.start("jobs", "pool", b)
    workers.start("jobs", "audit", c)
    await publish(workers.db, "jobs", range(300))
    await wait_until(lambda: len(read_ids(a)) + len(read_ids(b)) >= 300, 30, what="pool: 300")
    await wait_until(lambda: len(read_ids(c)) >= 300, 30, what="audit: 300")
    pool = Counter(read_ids(a) + read_ids(b))
    assert set(pool) == set(range(300))
    assert max(pool.values()) == 1, "a message was handled twice inside one group"
    assert read_ids(a), "both competing processes must take work"
    assert read_ids(b), "both competing processes must take work"
    assert sorted(read_ids(c)) == list(range(300))


async def test_doorbell_wakes_an_idle_consumer_in_another_process(
    workers: Workers, tmp_path: Path
) -> None:
    """With polling set to 30 s, a message still reaches an idle consumer process at once."""
    out = tmp_path / "idle.txt"
    workers.start("pings", "idle", out, poll=30.0)
    started = time.monotonic()
    await publish(workers.db, "pings", range(1))
    await wait_until(lambda: read_ids(out) == [0], 10, what="the idle consumer woken")
    assert time.monotonic() - started < 10  # far below the 30 s poll: the doorbell rang


async def test_concurrent_publishers_share_commits(tmp_path: Path) -> None:
    """Eight publishers awaiting 50 publishes each need far fewer than 400 commits."""
    async with connect(f"sqlite:///{tmp_path}/b.db") as broker:
        assert isinstance(broker, SqliteBroker)

        async def publisher(p: int) -> None:
            for n in range(50):
                event = Envelope.new("item", Item(n=n), source=f"/p{p}")
                await broker.publish("shared", encode_binary(event))

        async with asyncio.TaskGroup() as tasks:
            for p in range(8):
                tasks.create_task(publisher(p))
        commits, operations = broker.commit_counts
        assert operations >= 400
        assert commits < 400 * 0.6, f"{commits} commits for {operations} operations"
