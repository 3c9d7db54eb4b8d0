"""The bench's raw-sqlite3 floor does what the SQLite broker did: its fsyncs, its transactions."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import floor, sqlite_e2e, sqlite_procs, throughput
from bench.payload import make_messages

from wirework.envelope import WireMessage


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


def _replay_leaving_nothing(
    tmp_path: Path, durability: str, ran: list[floor.Replayed], messages: list[WireMessage]
) -> floor.FloorDb:
    """Replay ``ran`` on a new floor file; everything it published, it claimed and acked."""
    db = floor.FloorDb(tmp_path / "floor.db", durability=durability, message=messages[0])
    try:
        assert floor.replay(db, ran, messages=len(messages)) > 0
        left = db.connection.execute("SELECT COUNT(*) FROM ww_deliveries").fetchone()[0]
    finally:
        db.close()
    assert left == 0
    return db


async def test_the_replayed_floor_runs_the_brokers_own_transactions(tmp_path: Path) -> None:
    # What the broker's writer committed in a real run, run again with raw sqlite3:
    # every message published, claimed and acked, as many transactions synced.
    messages = make_messages(300)
    run = await sqlite_e2e.throughput(
        tmp_path / "broker.db", durability="strict", messages=messages, producer=sqlite_e2e.windowed
    )
    sizes = {
        kind: sum(size for done in run.ran for name, size in done.operations if name == kind)
        for kind in ("publish", "ack")
    }
    assert sizes == {"publish": 300, "ack": 300}
    assert any(name == "claim" for done in run.ran for name, _ in done.operations)
    assert len(run.ran) == run.transactions.commits
    assert sum(done.synced for done in run.ran) == run.transactions.synced

    replayed = _replay_leaving_nothing(tmp_path, "strict", run.ran, messages)
    assert replayed.synced == run.transactions.synced


def test_a_replay_that_is_not_one_run_is_refused(tmp_path: Path) -> None:
    message = make_messages(1)[0]
    db = floor.FloorDb(tmp_path / "floor.db", durability="fast", message=message)
    try:
        publish_then_ack = [
            floor.Replayed(0.0, True, [("publish", 4), ("ack", 1)]),  # acks what it never claimed
        ]
        with pytest.raises(RuntimeError, match="never claimed"):
            floor.replay(db, publish_then_ack, messages=4)
        short = [floor.Replayed(0.0, True, [("publish", 4), ("claim", 4), ("ack", 3)])]
        with pytest.raises(RuntimeError, match="acked 3 messages of 4"):
            floor.replay(db, short, messages=4)
    finally:
        db.close()


async def test_the_floor_replays_transactions_of_several_processes_in_commit_order(
    tmp_path: Path,
) -> None:
    # A publisher here and consumers in two child processes: their transactions merged
    # by the time each committed (taken with the write lock held) are one valid history,
    # in which every claim comes after the publish it claims, so the replay acks them all.
    messages = make_messages(400)
    run = await sqlite_procs.spread(
        tmp_path / "broker.db", durability="fast", messages=messages, processes=2, consumers=1
    )
    assert [one.at for one in run.ran] == sorted(one.at for one in run.ran)
    _replay_leaving_nothing(tmp_path, "fast", run.ran, messages)
