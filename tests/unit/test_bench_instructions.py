"""``bench.instructions`` runs its sides for real; only callgrind itself is left to the tool.

Each side runs here without valgrind, small, so a change to the bench or the
broker that breaks the yardstick shows in ``make test``, not months later.
"""

from __future__ import annotations

import json

import pytest
from bench import instructions


def test_the_broker_side_reports_the_transactions_the_floor_then_replays(
    capsys: pytest.CaptureFixture[str],
) -> None:
    instructions._inner("broker", 200, "fast", [])
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    operations = [operation for _at, _synced, done in ran for operation in done]
    assert sum(size for kind, size in operations if kind == "publish") == 200
    assert any(kind == "claim" for kind, _ in operations)
    instructions._inner("floor", 200, "fast", ran)  # raises unless it acks all 200
    instructions._inner("build", 10, "fast", [])
    instructions._inner("producer", 10, "fast", [])
