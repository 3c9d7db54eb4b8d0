"""Which event loop runs services: uvloop where it is installed, else asyncio's own.

Why ``wirework run`` picks uvloop by itself: its loop is written in C and does
the same work with fewer instructions. On the SQLite broker the event loop's
share of a message fell by 12 % (``python -m bench.instructions --uvloop``,
2026-11-27), and uvicorn, behind our REST binding, makes the same choice.
The library itself never picks a loop: code that calls ``asyncio.run`` gets
asyncio's. ``--loop asyncio`` is there to rule uvloop out when hunting a bug.
uvloop does not run on Windows; there ``auto`` means asyncio.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from wirework.errors import ConfigurationError

T = TypeVar("T")

LoopChoice = Literal["auto", "asyncio", "uvloop"]
Loop = Literal["asyncio", "uvloop"]

CHOICES: tuple[str, ...] = get_args(LoopChoice)


def uvloop_available() -> bool:
    return sys.platform != "win32" and importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> Loop:
    """The loop ``choice`` names; ``auto`` is uvloop when it can be imported."""
    if choice == "asyncio":
        return "asyncio"
    if choice == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    if choice == "uvloop":
        if not uvloop_available():
            raise ConfigurationError(
                "event loop 'uvloop' is not installed here "
                "(pip install 'wirework[cli]' on Linux or macOS, or choose --loop asyncio)"
            )
        return "uvloop"
    raise ConfigurationError(f"unknown event loop {choice!r}: write one of {', '.join(CHOICES)}")


def runner(loop: Loop) -> Callable[[Coroutine[Any, Any, T]], T]:
    """A function that runs a coroutine to its end on a new loop of that kind."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: which loop runs the calling code, for the start log line."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
