"""Workloads 4 and 5: a consumer with little or nothing to do (latency, CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench import floor, sqlite_e2e, sqlite_procs
from bench.payload import PREFETCH, make_messages
from bench.plan import Sizes, progress, run_sqlite_side, scratch
from bench.report import Figure


def percentile(samples: Sequence[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def latency(sizes: Sizes) -> list[Figure]:
    """Workload 4: one message at a time, the consumer idle in between (strict)."""
    messages = make_messages(sizes.latency_samples)
    gap = sizes.latency_gap
    with scratch() as tmp:
        here = run_sqlite_side(
            sqlite_e2e.latency(
                Path(tmp) / "here.db", durability="strict", messages=messages, gap=gap
            )
        )
        there = run_sqlite_side(
            sqlite_procs.cross_process_latency(
                Path(tmp) / "there.db", durability="strict", messages=messages, gap=gap
            )
        )
        connection = floor.FloorDb(Path(tmp) / "floor.db", durability="strict", message=messages[0])
        try:
            bottom = floor.latency(connection, samples=len(messages), gap=gap, claim_size=PREFETCH)
        finally:
            connection.close()
    notes = [
        f"{len(messages)} messages one at a time, {gap * 1000:.0f} ms idle before each; "
        f"from the publish() call to the handler's first line",
        "floor: a publish transaction then a claim transaction, one thread, nothing to wake",
    ]
    figures = []
    cases = (
        ("4a", "same process", here, "p50", 0.5, 5.0),
        ("4b", "same process", here, "p99", 0.99, None),
        ("4c", "other process", there, "p50", 0.5, 5.0),
        ("4d", "other process", there, "p99", 0.99, None),
    )
    for key, where, samples, name, share, target in cases:
        figures.append(
            Figure(
                key,
                f"idle latency {name}, consumer in {where} (strict)",
                1000 * percentile(samples, share),
                "ms",
                floor=1000 * percentile(bottom, share),
                higher_is_better=False,
                target=target,
                notes=notes if key == "4a" else [],
            )
        )
        progress(figures[-1])
    return figures


def idle_cpu(sizes: Sizes) -> list[Figure]:
    """Workload 5: CPU of a subscribed consumer process with nothing to do."""
    with scratch() as tmp:
        percent = run_sqlite_side(
            sqlite_procs.idle_cpu(
                Path(tmp) / "bench.db", durability="strict", seconds=sizes.idle_seconds
            )
        )
    figure = Figure(
        "5",
        "idle consumer process CPU",
        percent,
        "%",
        higher_is_better=False,
        target=2.0,
        notes=[
            f"one Consumer subscribed in its own process, nothing published; its CPU time "
            f"over {sizes.idle_seconds:g} s (psutil); it polls once per poll_interval (1 s)"
        ],
    )
    progress(figure)
    return [figure]
