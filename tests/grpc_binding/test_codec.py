"""pydantic ↔ protobuf through the runtime descriptors: values survive, absence means
what the model says, and the model's constraints still hold."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from wirework.errors import BadRequestError
from wirework.grpc.codec import Codec, MessageCodec
from wirework.grpc.proto import derive
from wirework.service import Service


class Colour(enum.Enum):
    RED = "r"
    GREEN = "g"


class Level(enum.IntEnum):
    ZERO = 0  # an IntEnum member whose value is 0 still differs from "not sent"
    ONE = 1


class Node(BaseModel):
    name: str
    children: list[Node] = []


class Everything(BaseModel):
    text: str
    number: int
    ratio: float
    flag: bool
    blob: bytes
    ident: uuid.UUID
    amount: decimal.Decimal
    moment: datetime.datetime
    day: datetime.date
    at: datetime.time
    colour: Colour
    level: Level
    mode: Literal["fast", "safe"]
    tree: Node
    maybe_text: str | None
    maybe_node: Node | None
    maybe_colour: Colour | None
    numbers: list[int]
    colours: list[Colour]
    nodes: list[Node]
    counts: dict[str, int]
    by_id: dict[int, Node]
    levels: dict[str, Level]
    defaulted: int = 7
    limited: str = Field("ok", max_length=3)


def codec_for(model: type[BaseModel]) -> MessageCodec[Any]:
    service = Service("codec")

    async def put(body: BaseModel) -> None:
        return None

    put.__annotations__["body"] = model
    service.post("/v1/put")(put)
    return Codec(derive(service)).codec(model.__name__)


FULL = Everything(
    text="héllo",
    number=-(2**62),
    ratio=0.25,
    flag=True,
    blob=b"\x00\xff",
    ident=uuid.UUID(int=3),
    amount=decimal.Decimal("-12.3400"),
    moment=datetime.datetime(
        2026, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    ),
    day=datetime.date(2026, 5, 6),
    at=datetime.time(7, 8, 9),
    colour=Colour.GREEN,
    level=Level.ZERO,
    mode="safe",
    tree=Node(name="root", children=[Node(name="leaf")]),
    maybe_text="",
    maybe_node=Node(name="n"),
    maybe_colour=Colour.RED,
    numbers=[0, 1, 2],
    colours=[Colour.RED, Colour.GREEN],
    nodes=[Node(name="a"), Node(name="b", children=[Node(name="c")])],
    counts={"x": 0, "y": 2},
    by_id={1: Node(name="one")},
    levels={"a": Level.ZERO, "b": Level.ONE},
    defaulted=0,
)


def test_every_supported_type_round_trips_exactly() -> None:
    codec = codec_for(Everything)

    assert codec.decode(codec.encode(FULL)) == FULL


def test_the_utc_offset_of_a_datetime_survives() -> None:
    codec = codec_for(Everything)

    moment = codec.decode(codec.encode(FULL)).moment

    assert moment.utcoffset() == datetime.timedelta(hours=2)


def test_none_stays_none_and_an_empty_string_stays_empty() -> None:
    codec = codec_for(Everything)
    value = FULL.model_copy(update={"maybe_text": None, "maybe_node": None, "maybe_colour": None})

    back = codec.decode(codec.encode(value))

    assert (back.maybe_text, back.maybe_node, back.maybe_colour) == (None, None, None)
    assert codec.decode(codec.encode(FULL)).maybe_text == ""


def test_an_absent_field_with_a_default_takes_the_default_not_zero() -> None:
    codec = codec_for(Everything)
    message = codec.to_message(FULL)
    message.ClearField("defaulted")

    assert codec.from_message(message).defaulted == 7


def test_an_unset_required_enum_is_a_missing_field_not_the_first_member() -> None:
    codec = codec_for(Everything)
    message = codec.to_message(FULL)
    message.ClearField("colour")

    with pytest.raises(BadRequestError, match="colour: Field required"):
        codec.from_message(message)


def test_an_unknown_enum_number_is_refused_by_the_model() -> None:
    codec = codec_for(Everything)
    message = codec.to_message(FULL)
    message.colour = 9  # open enums in proto3: the number travels, the model refuses it

    with pytest.raises(BadRequestError, match="colour: Input should be"):
        codec.from_message(message)


def test_the_models_constraints_hold_on_decoded_messages() -> None:
    codec = codec_for(Everything)
    message = codec.to_message(FULL)
    message.limited = "too long"
    message.mode = "reckless"

    with pytest.raises(BadRequestError) as caught:
        codec.from_message(message)

    assert "limited: String should have at most 3 characters" in str(caught.value)
    assert "mode: Input should be 'fast' or 'safe'" in str(caught.value)


def test_a_recursive_model_encodes_any_depth() -> None:
    codec = codec_for(Node)
    deep = Node(name="0")
    for level in range(1, 50):
        deep = Node(name=str(level), children=[deep])

    assert codec.decode(codec.encode(deep)) == deep
