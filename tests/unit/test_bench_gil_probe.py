"""``bench.gil_probe``'s overlap runs its sides for real: each alone does its own work only."""

from __future__ import annotations

from bench import gil_probe


def test_the_writer_alone_writes_and_the_main_thread_alone_counts() -> None:
    rows, chunks = gil_probe.overlap(writer=True, busy=False, interval=0.005, seconds=0.2)
    assert rows > 0
    assert chunks == 0
    rows, chunks = gil_probe.overlap(writer=False, busy=True, interval=0.005, seconds=0.2)
    assert rows == 0
    assert chunks > 0
