"""`make demo` is the main job: it must run, and say what happened truthfully."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def count(pattern: str, out: str) -> int:
    found = re.search(pattern + r"\s*│\s*(-?\d+)", out)
    assert found is not None, f"no {pattern!r} line in the demo's summary"
    return int(found.group(1))


@pytest.mark.parametrize("broker", ["", "memory://"], ids=["sqlite-default", "memory"])
def test_shop_demo_tells_the_whole_flow(tmp_path: Path, broker: str) -> None:
    """The shop shares the label queue, fans out, answers requests and dead-letters poison."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("WIREWORK_BROKER", None)
    if broker:
        env["WIREWORK_BROKER"] = broker
    result = subprocess.run(
        [sys.executable, "-m", "examples.shop"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert count("notifications sent", out) == 6
    assert count(r"revenue booked \(cents\)", out) == 3900 + 2500 + 7800
    a, b = count("labels printed by worker-a", out), count("labels printed by worker-b", out)
    assert (a + b, min(a, b) > 0) == (4, True), "both shipping workers share the 4 labels"
    assert out.count("shop.reserve_stock") == 6, "every order asked inventory"
    assert re.search(r"analytics\s+shop\.order_placed\s+\w+ <- \w+\s+3 attempts", out)
    assert "max_deliveries after 3 attempts" in out
    assert (tmp_path / ".demo" / "shop.db").exists() is (not broker)
