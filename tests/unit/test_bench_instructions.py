"""``bench.instructions`` runs its sides for real; only callgrind itself is left to the tool.

Each side runs here without valgrind, small, so a change to the bench or the
broker that breaks the yardstick shows in ``make test``, not months later.
"""

from __future__ import annotations

import json

import pytest
from bench import instructions


def test_the_broker_side_reports_the_shape_the_floor_then_replays(
    capsys: pytest.CaptureFixture[str],
) -> None:
    instructions._inner("broker", 200, "fast", {})
    shape = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shape["commits"] >= 1
    assert 1 <= shape["claims"] <= 200
    instructions._inner("floor", 200, "fast", shape)  # raises if its file runs short
    instructions._inner("build", 10, "fast", {})
    instructions._inner("producer", 10, "fast", {})
