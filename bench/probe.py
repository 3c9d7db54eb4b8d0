"""What a run observes besides its clock: the writer's transactions and CPU time."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil

from wirework.brokers.sqlite import SqliteBroker


@dataclass(frozen=True)
class Transactions:
    """Transactions a broker's writer committed, and the operations they held.

    ``synced`` counts the writing ones committed at the file's own level (with an
    fsync under strict): a floor pays for as many fsyncs as the broker did, no more.
    """

    commits: int = 0
    operations: int = 0
    synced: int = 0

    @classmethod
    def of(cls, broker: SqliteBroker) -> Transactions:
        return cls(*broker.commit_counts, broker.synced_commits)

    def __sub__(self, earlier: Transactions) -> Transactions:
        return Transactions(
            self.commits - earlier.commits,
            self.operations - earlier.operations,
            self.synced - earlier.synced,
        )

    @property
    def per_commit(self) -> float:
        return self.operations / self.commits if self.commits else 0.0


@dataclass(frozen=True)
class ThreadCpu:
    """CPU seconds of the event-loop thread and of every other thread (the writer)."""

    loop: float
    others: float

    def __sub__(self, earlier: ThreadCpu) -> ThreadCpu:
        return ThreadCpu(self.loop - earlier.loop, self.others - earlier.others)


def thread_cpu() -> ThreadCpu:
    """This process's CPU time so far, split by thread; call it on the event-loop thread."""
    me = threading.get_native_id()
    loop = others = 0.0
    for thread in psutil.Process().threads():
        spent = thread.user_time + thread.system_time
        if thread.id == me:
            loop += spent
        else:
            others += spent
    return ThreadCpu(loop, others)


def process_cpu(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def python_speed() -> float:
    """Median microseconds to decode one benchmark message: how fast this CPU is right now.

    Shared machines speed up and slow down; printed at the start and the end of
    a run, it tells a slow figure from a slow moment.
    """
    from bench.payload import Order, make_messages
    from wirework.envelope import decode_wire

    message = make_messages(1)[0]
    rounds = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            decode_wire(message).decode(Order)
        rounds.append((time.perf_counter() - started) / 500)
    return sorted(rounds)[len(rounds) // 2] * 1e6
