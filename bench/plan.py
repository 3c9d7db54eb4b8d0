"""How big a run is, where its files go, and the line printed as each figure is known."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.report import Figure, format_value
from wirework import loops

T = TypeVar("T")

#: The event loop of the SQLite suite's wirework side (``python -m bench --loop``),
#: in the environment so its worker processes run on the same one.
LOOP_VARIABLE = "WIREWORK_BENCH_LOOP"


@dataclass(frozen=True)
class Sizes:
    messages: int
    serial_messages: int
    latency_samples: int
    latency_gap: float
    idle_seconds: float
    backlog: int
    repeat: int = 1
    """Runs of each throughput case (1-3); the median one is reported with its own floor."""
    service_messages: int = 20_000
    """Backlog each side drains in the Service-overhead workload."""
    requests: int = 1_000
    """Requests sent one after another in each request-reply case."""
    concurrent_requests: int = 5_000
    """Requests sent with ``IN_FLIGHT`` of them outstanding in each request-reply case."""
    backend_messages: int = 20_000
    """Messages per side and producer shape on each server backend."""
    servers: tuple[str, ...] = ("redis", "rabbitmq", "nats")
    """Server backends the backend workloads run on (``bench.servers.SERVERS`` keys)."""


FULL = Sizes(20_000, 5_000, 300, 0.01, 10.0, 100_000)
QUICK = Sizes(
    2_000,
    1_000,
    50,
    0.01,
    3.0,
    10_000,
    service_messages=2_000,
    requests=200,
    concurrent_requests=1_000,
    backend_messages=2_000,
)


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for one workload's files, removed with everything in it."""
    return tempfile.TemporaryDirectory(prefix="wirework-bench-")


def progress(figure: Figure) -> None:
    """One line as soon as a figure is known, so a long run shows where it is."""
    value = format_value(figure.value, figure.unit)
    against = ""
    if figure.floor is not None:
        against = f" ({figure.floor_name} {format_value(figure.floor, figure.unit)})"
    if figure.peer is not None:
        against += f" ({figure.peer_name} {format_value(figure.peer, figure.unit)})"
    print(f"  {figure.key:<3} {figure.title}: {value}{against}", flush=True)


def sqlite_loop() -> loops.Loop:
    """The loop the SQLite suite runs wirework on: as ``wirework run`` picks it, unless told.

    The floor has no event loop, so the SQLite workloads measure wirework as
    its runtime runs it (uvloop where installed). The suites that compare with
    a peer library in the same process stay on asyncio's loop, as the peer does.
    """
    return loops.resolve(os.environ.get(LOOP_VARIABLE, "auto"))


def run_sqlite_side(work: Coroutine[Any, Any, T]) -> T:
    """Run one SQLite workload's wirework side to its end on ``sqlite_loop()``."""
    return loops.runner(sqlite_loop())(work)
