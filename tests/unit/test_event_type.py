"""``event_type``: the wire name of a body model, cached per class without keeping it alive."""

from __future__ import annotations

import gc
from typing import ClassVar

from pydantic import BaseModel

from wirework.envelope import _EVENT_TYPES, event_type


class Plain(BaseModel):
    n: int = 0


class Named(BaseModel):
    __event_type__: ClassVar[str] = "shop.named"


class NamedChild(Named):
    pass


class EmptyName(BaseModel):
    __event_type__: ClassVar[str] = ""


def test_the_class_name_unless_one_is_declared() -> None:
    assert event_type(Plain) == "Plain"
    assert event_type(Named) == "shop.named"
    assert event_type(NamedChild) == "shop.named"  # inherited, as a class attribute is
    assert event_type(EmptyName) == "EmptyName"  # an empty declaration is no name


def test_asking_again_gives_the_same_answer() -> None:
    assert [event_type(Named) for _ in range(3)] == ["shop.named"] * 3
    assert _EVENT_TYPES[Named] == "shop.named"


def test_a_model_made_at_run_time_is_not_kept_alive_by_the_cache() -> None:
    made = type("Made", (BaseModel,), {"__annotations__": {"n": int}})

    assert event_type(made) == "Made"
    count = len(_EVENT_TYPES)
    del made
    gc.collect()

    assert len(_EVENT_TYPES) == count - 1
