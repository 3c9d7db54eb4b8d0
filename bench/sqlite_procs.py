"""Workloads across processes: consumers in ``bench.worker`` children, the publisher here.

Every child is started inside ``worker()``, which kills and reaps it on the way
out whatever happened, and a child also ends by itself when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import floor, probe
from bench.payload import GROUP, SUBSCRIPTION, TOPIC
from bench.sqlite_e2e import open_broker, windowed
from wirework.envelope import WireMessage

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0
#: Longest JSON line read from a child: its transactions come in one (asyncio's default
#: of 64 KiB holds about a thousand).
LINE_LIMIT = 64 * 1024 * 1024


class Worker:
    """One ``bench.worker`` child and the JSON lines it writes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._unreadable: Exception | None = None
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            async for line in self.process.stdout:
                await self._events.put(json.loads(line))
        except (ValueError, OSError) as exc:  # a line over LINE_LIMIT, or not JSON
            self._unreadable = exc
        await self._events.put({"event": "exit"})

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(f"bench.worker {self.pid} exited with {self.process.returncode}")

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")

    async def expect(self, event: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """The next line of this kind (others are skipped); raises if the child exits first."""
        async with asyncio.timeout(timeout):
            while True:
                found = await self._events.get()
                if found["event"] == event:
                    return found
                if found["event"] == "exit":
                    if self._unreadable is not None:
                        raise RuntimeError(
                            f"cannot read bench.worker {self.pid}'s output: {self._unreadable}"
                        )
                    code = await self.process.wait()
                    raise RuntimeError(f"bench.worker {self.pid} exited with {code}")

    async def stop(self) -> dict[str, Any]:
        self.send("stop")
        done = await self.expect("done")
        await asyncio.wait_for(self.process.wait(), timeout=STARTUP_TIMEOUT)
        return done

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        # Read to the end: a reader stopped by a line over the limit leaves its buffer full
        # and the pipe paused, so its end is never seen and wait() waited forever (1 in 3).
        if self.process.stdout is not None:
            with contextlib.suppress(Exception):
                while await self.process.stdout.read(1 << 16):
                    pass
        await self.process.wait()


@contextlib.asynccontextmanager
async def worker(
    db: Path, *, durability: str, consumers: int, report_seen: bool = False, record: bool = False
) -> AsyncIterator[Worker]:
    """A started child that said ``ready``; killed and reaped on the way out.

    ``record``: it sends its transactions with its counts, for the floor to replay.
    """
    argv = ["--db", str(db), "--durability", durability, "--consumers", str(consumers)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.worker",
        *argv,
        *(["--report-seen"] if report_seen else []),
        *(["--record"] if record else []),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=LINE_LIMIT,
    )
    child = Worker(process)
    try:
        await child.expect("ready")
        yield child
    finally:
        await child.close()


class Watch:
    """A plain read connection to the broker file, to see what the other processes did."""

    def __init__(self, db: Path) -> None:
        self.connection = sqlite3.connect(db, timeout=5)

    def close(self) -> None:
        self.connection.close()

    def listeners(self) -> int:
        query = "SELECT COUNT(*) FROM ww_listeners WHERE topic = ?"
        return int(self.connection.execute(query, (TOPIC,)).fetchone()[0])

    def pending(self) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM ww_deliveries WHERE topic = ? AND grp = ?)"
        return bool(self.connection.execute(query, (TOPIC, GROUP)).fetchone()[0])

    async def until_listening(self, processes: int) -> None:
        """Until ``processes`` brokers subscribed (their group exists and doorbells are known)."""
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while self.listeners() < processes:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the other consumers of each process settle into their wait

    async def until_drained(self, children: Sequence[Worker]) -> None:
        """Until no delivery of the group is left; raises if a consumer process died."""
        while self.pending():
            for child in children:
                child.check_alive()
            await asyncio.sleep(0.002)


@dataclass
class Spread:
    messages: int
    seconds: float
    publish_seconds: float
    publisher: probe.Transactions
    workers: list[dict[str, Any]]
    ran: list[floor.Replayed]
    """Every process's transactions of the run, in the order they committed."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def commits(self) -> int:
        return self.publisher.commits + sum(int(done["commits"]) for done in self.workers)

    @property
    def synced(self) -> int:
        """Synced transactions, the publisher's and the consumer processes'."""
        return self.publisher.synced + sum(int(done["synced"]) for done in self.workers)

    @property
    def claims(self) -> int:
        """Worker operations that were not acks: their claims (empty ones included)."""
        return sum(int(done["operations"]) for done in self.workers) - self.messages


async def spread(
    db: Path, *, durability: str, messages: Sequence[WireMessage], processes: int, consumers: int
) -> Spread:
    """One windowed publisher here; ``consumers`` Consumers in each of ``processes`` children."""
    async with open_broker(db, durability) as broker, contextlib.AsyncExitStack() as stack:
        await broker.stats()  # creates the file before the children open it
        children = [
            await stack.enter_async_context(
                worker(db, durability=durability, consumers=consumers, record=True)
            )
            for _ in range(processes)
        ]
        watch = Watch(db)
        stack.callback(watch.close)
        for child in children:
            child.send("go")
        await watch.until_listening(processes)
        transactions = probe.Transactions.of(broker)
        recorded = broker.record_transactions()
        window_opens = time.monotonic()
        started = time.perf_counter()
        await windowed(broker, messages)
        published = time.perf_counter()
        await watch.until_drained(children)
        finished = time.perf_counter()
        window_closes = time.monotonic()
        publisher = probe.Transactions.of(broker) - transactions
        ran = floor.recorded(broker, recorded[:])
        done = [await child.stop() for child in children]
    for child_done in done:
        ran += [floor.Replayed(*fields) for fields in child_done.pop("ran")]
    # The children's claims before the first publish and after the drain found nothing.
    in_run = floor.in_order(ran, (window_opens, window_closes))
    return Spread(len(messages), finished - started, published - started, publisher, done, in_run)


async def cross_process_latency(
    db: Path, *, durability: str, messages: Sequence[WireMessage], gap: float
) -> list[float]:
    """Seconds from ``publish`` here to the handler in a child, ``gap`` idle between."""
    taken: list[float] = []
    async with open_broker(db, durability) as broker:
        await broker.stats()
        async with worker(db, durability=durability, consumers=1, report_seen=True) as child:
            watch = Watch(db)
            try:
                child.send("go")
                await watch.until_listening(1)
            finally:
                watch.close()
            for message in messages:
                await asyncio.sleep(gap)
                started = time.monotonic()
                await broker.publish(TOPIC, message)
                seen = await child.expect("seen", timeout=10)
                if seen["id"] != message.message_id:
                    raise RuntimeError(f"expected {message.message_id}, the child saw {seen['id']}")
                taken.append(seen["at"] - started)
            await child.stop()
    return taken


async def idle_cpu(db: Path, *, durability: str, seconds: float) -> float:
    """Percent of one core a subscribed, idle consumer process uses over ``seconds``."""
    async with open_broker(db, durability) as broker:
        await broker.stats()
        async with worker(db, durability=durability, consumers=1) as child:
            watch = Watch(db)
            try:
                child.send("go")
                await watch.until_listening(1)
            finally:
                watch.close()
            await asyncio.sleep(1.0)  # past the subscription's first claims
            before = probe.process_cpu(child.pid)
            await asyncio.sleep(seconds)
            spent = probe.process_cpu(child.pid) - before
            await child.stop()
    return 100 * spent / seconds


@dataclass
class Drain:
    messages: int
    seconds: float
    publish_seconds: float
    idle_rss: int
    peak_rss: int
    done: dict[str, Any]
    ran: list[floor.Replayed]
    """The consumer process's transactions of the drain, for the floor to run again."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def claims(self) -> int:
        return int(self.done["operations"]) - self.messages


async def drain(db: Path, *, pool: Sequence[WireMessage], count: int, copy_to: Path) -> Drain:
    """Publish a ``count`` backlog (fast), copy the file for the floor, drain it in a child."""
    async with open_broker(db, "fast") as broker:
        await broker.declare_group(SUBSCRIPTION)
        started = time.perf_counter()
        await windowed(broker, itertools.islice(itertools.cycle(pool), count))
        publish_seconds = time.perf_counter() - started
    shutil.copyfile(db, copy_to)  # the broker closed: its WAL is checkpointed into the file
    async with worker(db, durability="fast", consumers=1, record=True) as child:
        memory = psutil.Process(child.pid)
        idle_rss = peak_rss = memory.memory_info().rss
        watch = Watch(db)
        try:
            window_opens = time.monotonic()
            started = time.perf_counter()
            child.send("go")
            while watch.pending():
                child.check_alive()
                peak_rss = max(peak_rss, memory.memory_info().rss)
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - started
            window_closes = time.monotonic()
        finally:
            watch.close()
        peak_rss = max(peak_rss, memory.memory_info().rss)
        done = await child.stop()
    ran = [floor.Replayed(*fields) for fields in done.pop("ran")]
    in_run = floor.in_order(ran, (window_opens, window_closes))
    return Drain(count, seconds, publish_seconds, idle_rss, peak_rss, done, in_run)
