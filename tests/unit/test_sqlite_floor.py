"""The bench's raw-sqlite3 floor pays for as many fsyncs as the SQLite broker did, no more."""

from __future__ import annotations

from pathlib import Path

from bench import floor, throughput
from bench.payload import make_messages


def test_the_strict_floor_syncs_as_many_commits_as_the_broker_did(tmp_path: Path) -> None:
    # The broker syncs only its transactions holding a publish; a floor syncing all of
    # its own (each holds a publish, spread evenly) would be slower than the same work.
    message = make_messages(1)[0]
    _, note = throughput.floor_rate(
        tmp_path / "floor.db",
        durability="strict",
        message=message,
        count=64,
        claims=8,
        commits=16,
        synced=3,
    )
    assert "16 commits, 3 of them synced" in note


def test_the_floor_syncs_exactly_the_count_it_is_given(tmp_path: Path) -> None:
    message = make_messages(1)[0]
    for synced in (0, 1, 7, 2_000):
        db = floor.FloorDb(tmp_path / f"floor-{synced}.db", durability="strict", message=message)
        try:
            floor.throughput(db, count=4_096, claim_size=16, commits=2_503, synced=synced)
        finally:
            db.close()
        assert db.synced == synced


def test_without_a_count_the_floor_syncs_every_transaction_holding_a_publish(
    tmp_path: Path,
) -> None:
    message = make_messages(1)[0]
    db = floor.FloorDb(tmp_path / "floor.db", durability="strict", message=message)
    try:
        transactions = floor.plan(64, claim_size=8, commits=16, publish=True)
        floor.throughput(db, count=64, claim_size=8, commits=16)
    finally:
        db.close()
    holding = sum(any(kind == "publish" for kind, _ in runs) for runs in transactions)
    assert db.synced == holding
