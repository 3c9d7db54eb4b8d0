"""Instructions per message, counted by callgrind: a yardstick machine noise does not move.

``python -m bench.instructions [--messages 4000] [--durability fast]``. Needs
``valgrind`` (Debian: ``apt install valgrind``).

Wall-clock figures on the development machine move by 20-40 % between runs
minutes apart (a shared host), so a change worth 3 % needs many paired runs to
show. Callgrind counts the instructions executed instead: two runs of the same
code agree within about 0.3 %. This runs workload 1's shape (one producer with
100 publishes in flight, one ``Consumer``, one broker, in this process) and its
floor (``bench.floor.replay``: the broker's own transactions of that run, run
again with raw ``sqlite3``), each under callgrind at two sizes, and prints instructions
per message: the difference of the counts over the difference of the sizes,
which cancels start-up and imports. Building the messages (the CloudEvents the
producer sends) is counted apart and taken off the broker's figure, as the
wall-clock bench builds them before its clock starts. The bench's producer (100
lanes, each awaiting its publish) is counted apart too, publishing
to a stub: it is in the loop's figure, as it is in the wall-clock one, but it
is the application's code, not wirework's.

What it does not show is time. Valgrind runs one thread at a time, so the GIL
hand-overs between the event loop and the writer thread (``bench.gil_probe``)
cost nothing here, and neither does the disk. Use it to compare code; judge
targets with ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from wirework import loops
from wirework.brokers.base import Broker
from wirework.envelope import WireMessage

_TOTALS = re.compile(r"^totals:\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    main: int
    """Instructions of the main thread: the event loop, for the broker."""
    others: int
    """Of every other thread: the broker's writer (and a thread that joins it on close)."""
    ran: list[Any]
    """The broker's transactions (``floor.Replayed`` as JSON), for the floor to run again."""


def _inner(
    side: str, messages: int, durability: str, ran: list[Any], *, uvloop: bool = False
) -> None:
    """One measured run, in a process of its own under callgrind."""
    from bench import floor, sqlite_e2e
    from bench.payload import make_messages

    run_on_loop = loops.runner("uvloop" if uvloop else "asyncio")
    if side == "build":
        make_messages(messages)
        return
    if side == "producer":
        run_on_loop(sqlite_e2e.windowed(cast(Broker, _NoBroker()), make_messages(messages)))
        return
    with tempfile.TemporaryDirectory(prefix="wirework-instructions-") as tmp:
        if side == "broker":
            run = run_on_loop(
                sqlite_e2e.throughput(
                    Path(tmp) / "bench.db",
                    durability=durability,
                    messages=make_messages(messages),
                    producer=sqlite_e2e.windowed,
                )
            )
            print(json.dumps([[done.at, done.synced, done.operations] for done in run.ran]))
            return
        db = floor.FloorDb(
            Path(tmp) / "floor.db", durability=durability, message=make_messages(1)[0]
        )
        try:
            transactions = [floor.Replayed(*done) for done in ran]
            floor.replay(db, transactions, messages=messages)
        finally:
            db.close()


class _NoBroker:
    """A publish that only waits a turn of the loop, as a real one waits for its commit.

    Under the bench's producer it leaves the producer's own cost: a lane's wake-up
    a publish (application code, which the floor, with no event loop, does not have).
    """

    async def publish(self, topic: str, message: WireMessage) -> None:
        await asyncio.sleep(0)


def _count(side: str, messages: int, durability: str, ran: list[Any], *, uvloop: bool) -> Count:
    with tempfile.TemporaryDirectory(prefix="wirework-callgrind-") as tmp:
        return _counted(side, messages, durability, ran, Path(tmp), uvloop=uvloop)


def _counted(
    side: str,
    messages: int,
    durability: str,
    ran: list[Any],
    tmp: Path,
    *,
    uvloop: bool,
) -> Count:
    transactions = tmp / "ran.json"  # a file: too long for a command line at some sizes
    transactions.write_text(json.dumps(ran))
    command = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={tmp / 'out'}",
        sys.executable,
        "-m",
        "bench.instructions",
        "--inner",
        side,
        "--messages",
        str(messages),
        "--durability",
        durability,
        "--ran",
        str(transactions),
        *(["--uvloop"] if uvloop else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    # One file a thread: out-01 is the main thread, in the order threads started.
    totals = [
        int(found.group(1))
        for path in sorted(tmp.glob("out-*"))
        if (found := _TOTALS.search(path.read_text(errors="replace"))) is not None
    ]
    if done.returncode != 0 or not totals:
        raise SystemExit(f"callgrind run of {side!r} failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    return Count(totals[0], sum(totals[1:]), json.loads(lines[-1]) if side == "broker" else ran)


def measure(messages: int, durability: str, *, uvloop: bool = False) -> dict[str, float]:
    """Instructions per message: building one; the broker's loop and writer; its floor."""
    small = max(200, messages // 4)
    counts: dict[str, list[Count]] = {}
    ran: dict[int, list[Any]] = {}
    for side in ("build", "producer", "broker", "floor"):
        for size in (small, messages):
            print(f"  {side}, {size:,} messages under callgrind ...", flush=True)
            count = _count(side, size, durability, ran.get(size, []), uvloop=uvloop)
            if side == "broker":
                ran[size] = count.ran
            counts.setdefault(side, []).append(count)

    def per_message(side: str, part: str) -> float:
        first, second = (getattr(count, part) for count in counts[side])
        return float(second - first) / (messages - small)

    build = per_message("build", "main") + per_message("build", "others")
    return {
        "build": build,
        "loop": per_message("broker", "main") - build,
        "producer": per_message("producer", "main") - build,
        "writer": per_message("broker", "others"),
        "floor": per_message("floor", "main") + per_message("floor", "others"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--durability", choices=("strict", "fast"), default="fast")
    parser.add_argument(
        "--inner", choices=("build", "producer", "broker", "floor"), help=argparse.SUPPRESS
    )
    parser.add_argument("--ran", help=argparse.SUPPRESS)
    parser.add_argument(
        "--uvloop", action="store_true", help="run the broker's side on uvloop, not asyncio's loop"
    )
    args = parser.parse_args()
    if args.inner:
        _inner(
            args.inner,
            args.messages,
            args.durability,
            json.loads(Path(args.ran).read_text()) if args.ran else [],
            uvloop=args.uvloop,
        )
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt install valgrind (Debian), then run again")
    print(
        f"instructions per message, {args.messages:,} messages, {args.durability}, "
        f"one producer (window 100) and one Consumer in one process, "
        f"on {'uvloop' if args.uvloop else 'asyncio'}'s event loop",
        flush=True,
    )
    figures = measure(args.messages, args.durability, uvloop=args.uvloop)
    print()
    loop, writer, floor_ = figures["loop"], figures["writer"], figures["floor"]
    rows = [
        ("building one message (not counted below)", f"{figures['build']:,.0f}"),
        ("wirework, event loop", f"{loop:,.0f}"),
        ("  of which the bench's producer (lanes)", f"{figures['producer']:,.0f}"),
        ("wirework, writer thread", f"{writer:,.0f}"),
        ("wirework, both", f"{loop + writer:,.0f}"),
        ("floor: the same SQL with raw sqlite3", f"{floor_:,.0f}"),
        ("floor / both (loop and writer take turns)", f"{floor_ / (loop + writer):.2f}"),
        (
            "floor / both, the bench's producer left out",
            f"{floor_ / (loop - figures['producer'] + writer):.2f}",
        ),
        ("floor / the larger (were they side by side)", f"{floor_ / max(loop, writer):.2f}"),
    ]
    print()
    for name, value in rows:
        print(f"  {name:<50} {value:>10}")


if __name__ == "__main__":
    main()
