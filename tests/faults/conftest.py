"""Fixtures of the fault tests: a ``FaultRun`` whose workers die with the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.harness import FaultRun


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[FaultRun]:
    """A fresh broker file and ledger; every worker is killed and reaped at teardown."""
    fault_run = FaultRun(tmp_path)
    try:
        yield fault_run
    finally:
        await fault_run.aclose()
