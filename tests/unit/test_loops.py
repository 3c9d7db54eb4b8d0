"""``wirework run`` picks uvloop where it is installed, asyncio's loop otherwise or when told."""

from __future__ import annotations

import asyncio
import importlib.util
from importlib.machinery import ModuleSpec

import pytest

from wirework import loops
from wirework.errors import ConfigurationError


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "uvloop" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_auto_is_uvloop_where_it_is_installed() -> None:
    # The dev lock pins uvloop (this suite runs on Linux), so "auto" must find it.
    assert loops.uvloop_available()
    assert loops.resolve("auto") == "uvloop"
    assert loops.resolve("uvloop") == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    assert loops.resolve("auto") == "asyncio"


def test_asking_for_a_missing_uvloop_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    with pytest.raises(ConfigurationError, match=r"not installed.*--loop asyncio"):
        loops.resolve("uvloop")


def test_asyncio_is_asyncio_even_where_uvloop_is_installed() -> None:
    assert loops.resolve("asyncio") == "asyncio"


def test_an_unknown_loop_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"'trio'.*auto, asyncio, uvloop"):
        loops.resolve("trio")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_runner_runs_the_coroutine_on_the_loop_it_names(loop: loops.Loop) -> None:
    async def which() -> str:
        await asyncio.sleep(0)
        return loops.running_loop_name()

    # A plain test: no loop is running here, as in the main thread of `wirework run`.
    assert loops.runner(loop)(which()) == loop
