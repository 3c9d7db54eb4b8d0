"""Workloads 1, 2, 3 and 6: messages per second, each beside its floor."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import floor, sqlite_e2e, sqlite_procs
from bench.payload import make_messages
from bench.plan import Sizes, progress, run_sqlite_side, scratch
from bench.report import MIN_FLOOR_RATIO, Figure
from wirework.envelope import WireMessage

MIB = 1024 * 1024

#: One measured run: (wirework msg/s, floor msg/s, notes).
Run = tuple[float, float, list[str]]

#: key, durability, producer shape, producer, message count, target msg/s.
Case = tuple[str, str, str, sqlite_e2e.Producer, int, float | None]


def floor_rate(
    db: Path,
    *,
    durability: str,
    message: WireMessage,
    count: int,
    claims: int,
    commits: int,
    synced: int | None,
    publish: bool = True,
) -> tuple[float, str]:
    """The floor's msg/s for a run that made ``claims`` claims in ``commits`` transactions.

    ``synced``: how many of them the broker synced, for the floor to sync as many
    under strict (None: every floor transaction holding a publish is synced).
    """
    claim_size = max(1, round(count / max(1, claims)))
    connection = floor.FloorDb(db, durability=durability, message=message)
    try:
        rate = floor.throughput(
            connection,
            count=count,
            claim_size=claim_size,
            commits=commits,
            publish=publish,
            synced=synced,
        )
        fsyncs = f", {connection.synced:,} of them synced" if connection.strict else ""
    finally:
        connection.close()
    what = "publish, " if publish else ""
    rows = "1 row" if claim_size == 1 else f"{claim_size} rows"
    return rate, f"floor: {what}claims of {rows}, ack; {commits:,} commits{fsyncs}"


def replayed_rate(
    db: Path, *, durability: str, message: WireMessage, ran: list[floor.Replayed], messages: int
) -> tuple[float, str]:
    """The floor's msg/s running the broker's own transactions of a run again."""
    connection = floor.FloorDb(db, durability=durability, message=message)
    try:
        rate = floor.replay(connection, ran, messages=messages)
        fsyncs = f", {connection.synced:,} of them synced" if connection.strict else ""
    finally:
        connection.close()
    left_out = floor.others(ran)
    others = f"; {left_out:,} other operations left out" if left_out else ""
    return rate, f"floor: the broker's {len(ran):,} transactions run again{fsyncs}{others}"


def spread_evenly(note: str, rate: float, wirework: float) -> str:
    """The note of the floor spread evenly, the one judged until 2026-11-27, for comparison."""
    again = note.replace("floor:", "floor spread evenly (judged until 2026-11-27):")
    return f"{again}: {rate:,.0f} msg/s, ratio {wirework / rate:.2f}"


def floors(
    replay_db: Path,
    even_db: Path,
    *,
    durability: str,
    message: WireMessage,
    ran: list[floor.Replayed],
    wirework: float,
    messages: int,
    claims: int,
    commits: int,
    synced: int | None,
    publish: bool = True,
) -> tuple[float, list[str]]:
    """The judged floor (the broker's transactions run again) and both floors' notes.

    The floor spread evenly runs after it, on ``even_db``, for comparison only.
    """
    value, note = replayed_rate(
        replay_db, durability=durability, message=message, ran=ran, messages=messages
    )
    even_value, even_note = floor_rate(
        even_db,
        durability=durability,
        message=message,
        count=messages,
        claims=claims,
        commits=commits,
        synced=synced,
        publish=publish,
    )
    return value, [note, spread_evenly(even_note, even_value, wirework)]


def per_message(seconds: float, messages: int) -> str:
    return f"{seconds / max(1, messages) * 1e6:.0f} us"


def median_run(repeat: int, measure: Callable[[], Run]) -> Run:
    """Measure ``repeat`` times; the run with the median rate, with its own floor."""
    runs = sorted((measure() for _ in range(repeat)), key=lambda run: run[0])
    value, floor_value, notes = runs[len(runs) // 2]
    if repeat > 1:
        spread = ", ".join(f"{run[0]:,.0f}/{run[1]:,.0f}" for run in runs)
        notes = [*notes, f"median of {repeat} runs (wirework/floor msg/s: {spread})"]
    return value, floor_value, notes


def one_producer(sizes: Sizes) -> list[Figure]:
    """Workload 1: one producer task and one Consumer in this process."""
    windowed, serial = sqlite_e2e.windowed, sqlite_e2e.serial
    return _in_process(
        sizes,
        [
            ("1a", "strict", "1 producer, window 100", windowed, sizes.messages, 3_000),
            ("1b", "strict", "1 producer, serial", serial, sizes.serial_messages, None),
            ("1c", "fast", "1 producer, window 100", windowed, sizes.messages, 10_000),
        ],
    )


def eight_publishers(sizes: Sizes) -> list[Figure]:
    """Workload 2: 8 publisher tasks, each awaiting its publishes, and one Consumer."""
    publishers = sqlite_e2e.concurrent_publishers
    return _in_process(
        sizes,
        [
            ("2a", "strict", "8 publishers", publishers, sizes.messages, 8_000),
            ("2b", "fast", "8 publishers", publishers, sizes.messages, 10_000),
        ],
    )


def _in_process(sizes: Sizes, cases: Sequence[Case]) -> list[Figure]:
    messages = make_messages(max(case[4] for case in cases))
    figures = []
    for key, durability, shape, producer, count, target in cases:

        def measure(
            durability: str = durability,
            producer: sqlite_e2e.Producer = producer,
            batch: Sequence[WireMessage] = messages[:count],
        ) -> Run:
            with scratch() as tmp:
                run = run_sqlite_side(
                    sqlite_e2e.throughput(
                        Path(tmp) / "bench.db",
                        durability=durability,
                        messages=batch,
                        producer=producer,
                    )
                )
                claims = run.transactions.operations - 2 * run.messages
                floor_value, floor_notes = floors(
                    Path(tmp) / "floor.db",
                    Path(tmp) / "floor-even.db",
                    durability=durability,
                    message=batch[0],
                    ran=run.ran,
                    wirework=run.rate,
                    messages=run.messages,
                    claims=claims,
                    commits=run.transactions.commits,
                    synced=run.transactions.synced,
                )
            return (
                run.rate,
                floor_value,
                [
                    f"publishing alone took {run.publish_seconds:.2f} s "
                    f"({run.publish_rate:,.0f} msg/s); end to end {run.seconds:.2f} s",
                    f"writer: {run.transactions.commits:,} transactions, "
                    f"{run.transactions.per_commit:.1f} operations each, {claims:,} claims",
                    f"CPU per message: event loop {per_message(run.cpu.loop, run.messages)}, "
                    f"writer thread {per_message(run.cpu.others, run.messages)}",
                    *floor_notes,
                ],
            )

        value, floor_value, notes = median_run(sizes.repeat, measure)
        figures.append(
            Figure(
                key,
                f"{durability}, {shape}, {count:,} msgs",
                value,
                "msg/s",
                floor=floor_value,
                target=target,
                min_ratio=MIN_FLOOR_RATIO,
                notes=notes,
            )
        )
        progress(figures[-1])
    return figures


def processes(sizes: Sizes) -> list[Figure]:
    """Workload 3: one publisher here, 2 consumers in each of 2 child processes."""
    messages = make_messages(sizes.messages)
    figures = []
    for key, durability, target in (("3a", "strict", 3_000), ("3b", "fast", 10_000)):

        def measure(durability: str = durability) -> Run:
            with scratch() as tmp:
                run = run_sqlite_side(
                    sqlite_procs.spread(
                        Path(tmp) / "bench.db",
                        durability=durability,
                        messages=messages,
                        processes=2,
                        consumers=2,
                    )
                )
                floor_value, (floor_note, even_note) = floors(
                    Path(tmp) / "floor.db",
                    Path(tmp) / "floor-even.db",
                    durability=durability,
                    message=messages[0],
                    ran=run.ran,
                    wirework=run.rate,
                    messages=run.messages,
                    claims=run.claims,
                    commits=run.commits,
                    synced=run.synced,
                )
            handled = [int(done["handled"]) for done in run.workers]
            cpu = [
                per_message(float(done["cpu_seconds"]), int(done["handled"]))
                for done in run.workers
            ]
            commits = [int(done["commits"]) for done in run.workers]
            return (
                run.rate,
                floor_value,
                [
                    f"publishing alone took {run.publish_seconds:.2f} s; end to end "
                    f"{run.seconds:.2f} s; handled per process {handled}",
                    f"consumer process CPU per message {cpu}; transactions: publisher "
                    f"{run.publisher.commits:,}, consumer processes {commits}",
                    floor_note + ", in the order they committed, on one connection",
                    even_note,
                ],
            )

        value, floor_value, notes = median_run(sizes.repeat, measure)
        figures.append(
            Figure(
                key,
                f"{durability}, 1 producer (window 100), 2 procs x 2 consumers",
                value,
                "msg/s",
                floor=floor_value,
                target=target,
                min_ratio=MIN_FLOOR_RATIO,
                notes=notes,
            )
        )
        progress(figures[-1])
    return figures


def backlog(sizes: Sizes) -> list[Figure]:
    """Workload 6: drain a backlog with one consumer in a child process (fast); run once."""
    pool = make_messages(1_000)
    with scratch() as tmp:
        copy = Path(tmp) / "floor.db"
        run = run_sqlite_side(
            sqlite_procs.drain(Path(tmp) / "bench.db", pool=pool, count=sizes.backlog, copy_to=copy)
        )
        copy_for_even = Path(tmp) / "floor-even.db"
        shutil.copyfile(copy, copy_for_even)
        floor_value, (floor_note, even_note) = floors(
            copy,
            copy_for_even,
            durability="fast",
            message=pool[0],
            ran=run.ran,
            wirework=run.rate,
            messages=run.messages,
            claims=run.claims,
            commits=int(run.done["commits"]),
            synced=None,  # fast: nothing is synced at commit on either side
            publish=False,
        )
    cpu = per_message(float(run.done["cpu_seconds"]), run.messages)
    figures = [
        Figure(
            "6a",
            f"drain a {run.messages:,} backlog, 1 consumer process (fast)",
            run.rate,
            "msg/s",
            floor=floor_value,
            min_ratio=MIN_FLOOR_RATIO,
            notes=[
                f"backlog published in {run.publish_seconds:.1f} s (window 100, 1,000 distinct "
                f"events cycled); drained in {run.seconds:.1f} s; consumer CPU per message {cpu}",
                f"consumer: {int(run.done['commits']):,} transactions, {run.claims:,} claims",
                floor_note + ", on a copy of the same backlog file",
                even_note,
            ],
        ),
        Figure(
            "6b",
            "peak RSS of that consumer process",
            run.peak_rss / MIB,
            "MiB",
            higher_is_better=False,
            target=200,
            notes=[
                f"RSS before it started consuming {run.idle_rss / MIB:.0f} MiB; polled every 20 ms"
            ],
        ),
    ]
    for figure in figures:
        progress(figure)
    return figures
