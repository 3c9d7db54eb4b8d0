"""`make demo` is the main job: it must run, and say what happened truthfully."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_on_sqlite(tmp_path: Path) -> None:
    """The walk-through shares the queue between workers, fans out, and dead-letters poison."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("WIREWORK_BROKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "worker-a printed" in out
    assert "worker-b printed" in out
    assert "notifications 12, analytics 11" in out
    assert "max_deliveries" in out
    assert (tmp_path / ".demo" / "shop.db").exists()
