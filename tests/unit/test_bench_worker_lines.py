"""The bench reads a child's long JSON lines, and says so when it cannot, without hanging."""

from __future__ import annotations

import asyncio
import sys

import pytest
from bench import sqlite_procs

_LONG = 1_000_000  # a worker's transactions of a big run come in one line this long


async def _child_printing_a_long_line(*, limit: int) -> sqlite_procs.Worker:
    program = f"import json; print(json.dumps({{'event': 'done', 'ran': 'x' * {_LONG}}}))"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=limit,
    )
    return sqlite_procs.Worker(process)


async def test_a_line_up_to_the_limit_is_read() -> None:
    child = await _child_printing_a_long_line(limit=sqlite_procs.LINE_LIMIT)
    try:
        done = await child.expect("done", timeout=30)
    finally:
        await child.close()
    assert len(done["ran"]) == _LONG


async def test_a_line_over_the_limit_is_an_error_naming_the_child() -> None:
    child = await _child_printing_a_long_line(limit=64 * 1024)  # asyncio's default
    try:
        with pytest.raises(RuntimeError, match=rf"cannot read bench.worker {child.pid}'s output"):
            await child.expect("done", timeout=30)
    finally:
        await child.close()
