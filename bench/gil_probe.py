"""Why an in-process SQLite broker cannot reach half its floor: the writer thread and the GIL.

``python -m bench.gil_probe [messages]``. Runs the floor's own transactions
(``bench.floor``: the broker's SQL, publish, claims of 16, ack, fast) on a
thread, as the broker's writer runs them, beside a main thread that is either
idle (the baseline: the floor's own speed) or busy with plain Python, as an
event loop handling messages is. Then again for several switch intervals.

What it shows: ``sqlite3`` lets go of the GIL for every step of every
statement (each row a ``RETURNING`` or ``SELECT`` hands back is a step), and a
thread that wants the GIL back while the other thread runs Python waits for
that thread to block, or for the switch interval (5 ms by default) to force a
switch. So the writer runs its SQL while the loop idles, not beside it: loop
and writer alternate, and the broker's in-process throughput is their sum, not
the larger of the two. A shorter interval only trades that for a wait a step.
The probe is the evidence for the ratio targets of issue 2 (see docs/sqlite.md,
"Throughput in one process"), and the reason the broker's event loop now runs
its bounded transactions itself (``wirework.brokers.sqlite_writer``; under
strict the WAL's sync follows on a thread of its own): handing them to a
thread bought turns, not overlap.

Its second table asks whether fewer hand-overs would let them overlap: a
writer whose transaction is four statements for 64 rows of 1 KiB (a
multi-row INSERT and a DELETE, no row handed back one by one) beside the same
busy main thread, each side's speed as a fraction of its speed alone. Two
threads that overlapped would add up to nearly 2; they add up to about 1.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench import floor
from bench.payload import make_messages

CLAIM_SIZE = 16
#: Busy-work chunk of the main thread between checks: about 50 us of pure Python.
_CHUNK = 2_000


@contextlib.contextmanager
def _switch_interval(interval: float) -> Iterator[None]:
    """``sys.setswitchinterval(interval)`` for the block, then as it was."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _busy_chunk() -> int:
    """About 50 us of plain Python, as an event loop handling a message runs."""
    total = 0
    for number in range(_CHUNK):
        total += number
    return total


def writer_rate(messages: int, *, busy: bool, interval: float) -> tuple[float, int]:
    """The floor's msg/s on a second thread; and how many busy chunks the main thread ran."""
    with _switch_interval(interval), tempfile.TemporaryDirectory() as scratch:
        outcome: dict[str, float] = {}
        message = make_messages(1)[0]

        def write() -> None:
            # A connection belongs to the thread that opened it, as in the broker.
            db = floor.FloorDb(Path(scratch) / "probe.db", durability="fast", message=message)
            try:
                outcome["rate"] = floor.throughput(
                    db,
                    count=messages,
                    claim_size=CLAIM_SIZE,
                    commits=-(-messages // CLAIM_SIZE),
                )
            finally:
                db.close()

        thread = threading.Thread(target=write)
        thread.start()
        chunks = 0
        while thread.is_alive():
            if busy:
                _busy_chunk()
                chunks += 1
            else:
                thread.join(0.01)
        thread.join()
        return outcome["rate"], chunks


#: Rows a transaction of the few-statements writer inserts and deletes.
_ROWS = 64
_OVERLAP_SECONDS = 1.5


def _few_statements(path: Path, stop: threading.Event, done: dict[str, float]) -> None:
    """Transactions of 64 rows in 4 statements, until ``stop``; rows written into ``done``."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body BLOB)")
        insert = "INSERT INTO rows (body) VALUES " + ", ".join(["(?)"] * _ROWS)
        body = b"x" * 1024
        rows = 0
        while not stop.is_set():
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(insert, [body] * _ROWS)
            connection.execute("DELETE FROM rows")
            connection.execute("COMMIT")
            rows += _ROWS
        done["rows"] = rows
    finally:
        connection.close()


def overlap(
    *, writer: bool, busy: bool, interval: float, seconds: float = _OVERLAP_SECONDS
) -> tuple[float, float]:
    """(writer rows/s, main-thread chunks/s) over a fixed time, either side on or off."""
    with _switch_interval(interval), tempfile.TemporaryDirectory() as scratch:
        stop, done = threading.Event(), {"rows": 0.0}
        thread = threading.Thread(
            target=_few_statements, args=(Path(scratch) / "overlap.db", stop, done)
        )
        if writer:
            thread.start()
        chunks, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            if busy:
                _busy_chunk()
                chunks += 1
            else:
                time.sleep(0.01)
        stop.set()
        if writer:
            thread.join()
        return done["rows"] / seconds, chunks / seconds


def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    baseline, _ = writer_rate(messages, busy=False, interval=0.005)
    print(f"floor on a thread, main thread idle: {baseline:,.0f} msg/s (the baseline)")
    print(f"busy runs: {max(CLAIM_SIZE, messages // 20):,} messages each")
    print(f"{'main thread':<12} {'switch interval':>15} {'writer msg/s':>13} {'x baseline':>11}")
    # A twentieth of the messages when busy: at the default interval the writer does
    # about a hundred a second.
    busy_messages = max(CLAIM_SIZE, messages // 20)
    for interval in (0.005, 0.0005, 0.0001, 0.00002):
        started = time.perf_counter()
        rate, chunks = writer_rate(busy_messages, busy=True, interval=interval)
        seconds = time.perf_counter() - started
        print(
            f"{'busy':<12} {interval * 1e6:>12.0f} us {rate:>13,.0f} {rate / baseline:>11.3f}"
            f"   (main thread: {chunks / seconds:,.0f} chunks/s)"
        )
    rows_alone, _ = overlap(writer=True, busy=False, interval=0.005)
    _, chunks_alone = overlap(writer=False, busy=True, interval=0.005)
    print(
        f"\nfew statements ({_ROWS} rows in 4 statements a transaction): writer alone "
        f"{rows_alone:,.0f} rows/s, main thread alone {chunks_alone:,.0f} chunks/s"
    )
    print(f"{'switch interval':>15} {'writer':>7} {'main':>6} {'sum':>5}  (2 = side by side)")
    for interval in (0.005, 0.001, 0.0002, 0.00005):
        rows_rate, chunk_rate = overlap(writer=True, busy=True, interval=interval)
        writer_part, main_part = rows_rate / rows_alone, chunk_rate / chunks_alone
        print(
            f"{interval * 1e6:>12.0f} us {writer_part:>7.0%} {main_part:>6.0%} "
            f"{writer_part + main_part:>5.2f}"
        )


if __name__ == "__main__":
    main()
