"""The numbered examples run as a new user runs them, and print what really happened.

Each runs in a fresh process from an empty working directory, on the
embedded SQLite default and on ``memory://``; the checks read its story line
by line, so an example that exits 0 while telling something false fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(params=["", "memory://"], ids=["sqlite-default", "memory"])
def broker(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def run(name: str, broker: str, cwd: Path) -> list[str]:
    """Run ``examples/<name>.py`` like ``python examples/<name>.py``; its stdout lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("WIREWORK_BROKER", None)
    if broker:
        env["WIREWORK_BROKER"] = broker
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == [], "the example leaves nothing in the working directory"
    return result.stdout.splitlines()


def test_competing_workers_share_the_jobs(broker: str, tmp_path: Path) -> None:
    """Each of the six jobs is done once, and both workers took some."""
    lines = run("01_competing_workers", broker, tmp_path)
    done = [re.fullmatch(r"(worker-[ab]) resized (photo-\d\.jpg)", line) for line in lines[:-1]]
    assert all(done), lines
    assert sorted(m[2] for m in done if m) == [f"photo-{n}.jpg" for n in range(1, 7)]
    summary = re.fullmatch(
        r"6 jobs sent, 6 done, 0 twice: worker-a did (\d), worker-b did (\d)", lines[-1]
    )
    assert summary is not None, lines[-1]
    assert min(int(summary[1]), int(summary[2])) > 0, "both workers took jobs"


def test_fan_out_gives_each_group_every_event(broker: str, tmp_path: Path) -> None:
    """email and analytics each get the same three events, one copy apiece."""
    lines = run("02_fan_out", broker, tmp_path)
    got = [re.fullmatch(r"(email|analytics) +got (\w{8}): .+", line) for line in lines[:-1]]
    assert all(got), lines
    by_group = {
        group: sorted(m[2] for m in got if m and m[1] == group) for group in ("email", "analytics")
    }
    assert len(set(by_group["email"])) == 3
    assert by_group["email"] == by_group["analytics"], "both groups saw the same messages"
    assert lines[-1] == "3 events published; analytics got 3, email got 3"


def test_request_reply_answers_refuses_and_times_out(broker: str, tmp_path: Path) -> None:
    """A reply, a responder's error, and a deadline missed by a slow responder."""
    assert run("03_request_reply", broker, tmp_path) == [
        "reserve 2 kettle: reserved, 3 left",
        "reserve 9 kettle: refused: only 3 kettle left",
        "reserve 1 anvil: no reply within 0.5 s, gave up",
    ]


def test_poison_is_dead_lettered_then_replayed_after_the_fix(broker: str, tmp_path: Path) -> None:
    """inv-2 fails three times without holding up the others, then succeeds once replayed."""
    lines = run("04_poison_and_replay", broker, tmp_path)
    dead_at = lines.index("inv-2 dead-lettered: max_deliveries, 3 attempts")
    before, after = lines[:dead_at], lines[dead_at + 1 :]
    assert sorted(before) == sorted(
        [f"inv-2 failed on attempt {n}" for n in (1, 2, 3)]
        + ["inv-1 issued on attempt 1", "inv-3 issued on attempt 1"]
    )
    assert after == [
        "fix deployed; replayed 1 dead letter",
        "inv-2 issued on attempt 1",
        "issued inv-1, inv-2, inv-3; 0 dead letters left",
    ]
