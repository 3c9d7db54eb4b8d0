"""The SQLite bench runs wirework on the loop ``wirework run`` picks, or on the one it is told."""

from __future__ import annotations

import pytest
from bench import plan

from wirework import loops


async def _which() -> str:
    return loops.running_loop_name()


def test_by_default_the_sqlite_suite_runs_on_what_wirework_run_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(plan.LOOP_VARIABLE, raising=False)
    assert plan.sqlite_loop() == loops.resolve("auto") == "uvloop"
    assert plan.run_sqlite_side(_which()) == "uvloop"


def test_told_asyncio_it_runs_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set in the environment, so the suite's worker processes inherit it.
    monkeypatch.setenv(plan.LOOP_VARIABLE, "asyncio")
    assert plan.run_sqlite_side(_which()) == "asyncio"
