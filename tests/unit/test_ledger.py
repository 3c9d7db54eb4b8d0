"""The fault-test ledger: its file format and the checker every fault test trusts."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirework.brokers import DeadLetterStore, connect
from wirework.testing.ledger import SUFFIX, History, LedgerFile, check, drain, parse


def write(directory: Path, name: str, *lines: tuple[str, str]) -> None:
    with LedgerFile(directory / f"{name}{SUFFIX}") as ledger:
        for kind, message_id in lines:
            ledger.record(kind, message_id)


def test_records_round_trip_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    """A record reads back as written; a line cut short by a kill is not read at all."""
    with LedgerFile(tmp_path / f"p0.1{SUFFIX}") as ledger:
        at = ledger.record("ok", "p0-1", dt="0.002", error="two words")
    with (tmp_path / f"p0.1{SUFFIX}").open("a") as torn:
        torn.write("ok p0-2 12.5")
    (record,) = History.read(tmp_path).records
    assert (record.process, record.kind, record.id) == ("p0.1", "ok", "p0-1")
    assert record.at == pytest.approx(at, abs=1e-6)
    assert record.fields == {"dt": "0.002", "error": "two_words"}
    assert parse("invoke p0-3 1.0\nbroken\n", process="x")[0].id == "p0-3"


def test_checker_counts_every_kind_of_outcome(tmp_path: Path) -> None:
    """Lost, unexpected, failed-but-present, recovered and redeliveries come out of the files."""
    write(
        tmp_path,
        "p0.1",
        *[("invoke", f"p0-{n}") for n in range(7)],
        ("ok", "p0-0"),
        ("ok", "p0-1"),
        ("ok", "p0-2"),
        ("ok", "p0-3"),
        ("fail", "p0-4"),
        ("info", "p0-5"),
        # p0-6: invoked, then the process died: an unknown outcome.
    )
    write(
        tmp_path,
        "c0.2",
        *[("invoked", one) for one in ("p0-0", "p0-0", "p0-1", "p0-4", "p0-5", "zz-9")],
        *[("acked", one) for one in ("p0-0", "p0-0", "p0-4", "p0-5")],
        # p0-3: an ack begun, then the process died: it held or its message came back.
        ("acking", "p0-3"),
        # p0-2: an ack begun and refused: answered, so p0-2 stays lost.
        ("acking", "p0-2"),
        ("ack_failed", "p0-2"),
    )
    result = check(History.read(tmp_path), dead_lettered=["p0-1"])
    assert result.counts() == {
        "attempted": 7,
        "acked": 4,
        "failed": 1,
        "info": 2,
        "invoked": 5,
        "invocations": 6,
        "effected": 3,
        "dlq": 1,
        "lost": 1,
        "unexpected": 1,
        "dup_effects": 1,
        "failed_but_present": 1,
        "recovered": 1,
        "redeliveries": 1,
        "ack_unknown": 1,
    }
    assert result.lost == {"p0-2"}
    assert result.ack_unknown == {"p0-3"}
    assert result.unexpected == {"zz-9"}
    assert result.failed_but_present == {"p0-4"}
    assert result.recovered == {"p0-5"}
    assert "lost: p0-2" in str(result)
    # Where an inbox's effect rows are the effect, a begun ack proves nothing.
    by_effect = check(History.read(tmp_path), dead_lettered=["p0-1"], effect="effect")
    assert by_effect.ack_unknown == frozenset()


async def test_drain_stops_when_caught_up_or_quiet(tmp_path: Path) -> None:
    """The drain ends at once when nothing acked is missing, and after ``quiet`` otherwise."""
    broker = connect("memory://")
    assert isinstance(broker, DeadLetterStore)
    try:
        write(tmp_path, "p0.1", ("invoke", "p0-0"), ("ok", "p0-0"), ("invoke", "p0-1"))
        write(tmp_path, "c0.2", ("invoked", "p0-0"), ("acked", "p0-0"))
        caught_up = await drain(tmp_path, broker, quiet=5.0, timeout=5.0)
        assert not caught_up.lost

        write(tmp_path, "p1.3", ("invoke", "p1-0"), ("ok", "p1-0"))
        stuck = await drain(tmp_path, broker, quiet=0.2, timeout=5.0)
        assert stuck.lost == {"p1-0"}
    finally:
        await broker.aclose()


async def test_drain_reads_dead_letters_before_the_ledger(tmp_path: Path) -> None:
    """A consumer records its last invocation, then dead-letters the message: a drain that
    read the ledger first could see the dead letter without that invocation."""
    write(tmp_path, "p0.1", ("invoke", "p0-1"), ("ok", "p0-1"))
    write(tmp_path, "c0.2", ("invoked", "p0-1"))

    class DeadLettersMeanwhile:
        """Answers as if the second invocation and its dead letter happened just now."""

        async def dead_letters(self, **_: object) -> list[object]:
            write(tmp_path, "c0.3", ("invoked", "p0-1"))

            class Letter:
                id, message_id = 1, "p0-1"

            return [Letter()]

    result = await drain(tmp_path, DeadLettersMeanwhile(), quiet=5, timeout=5)  # type: ignore[arg-type]
    assert not result.lost
    assert result.invocations["p0-1"] == 2
