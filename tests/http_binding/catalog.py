"""A small service every HTTP test serves: each kind of endpoint, and errors on purpose."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from wirework.errors import ConflictError, NotFoundError, ServiceUnavailableError
from wirework.service import CallContext, Service


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class NewItem(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    price: int = Field(ge=0, le=1_000_000)
    colour: Colour = Colour.RED
    tags: list[str] = Field(default_factory=list, max_length=10)


class Item(BaseModel):
    id: int
    name: str
    price: int
    colour: Colour
    tags: list[str]


class Items(BaseModel):
    items: list[Item]


class Seen(BaseModel):
    host: str | None
    deadline_ms: int | None
    idempotency_key: str | None
    peer: str | None
    user_agent: str | None


class Tally(BaseModel):
    count: int
    total: int


class Note(BaseModel):
    text: str


class Stock:
    """The catalogue's state, a dependency the service provides."""

    def __init__(self) -> None:
        self.items: dict[int, Item] = {
            1: Item(id=1, name="lamp", price=30, colour=Colour.RED, tags=[]),
            2: Item(id=2, name="desk", price=200, colour=Colour.BLUE, tags=["wood"]),
        }


catalog = Service("catalog")
catalog.provide(Stock, Stock)


@catalog.get("/v1/items/{item_id}")
async def get_item(item_id: int, stock: Stock) -> Item:
    """Read one item."""
    item = stock.items.get(item_id)
    if item is None:
        raise NotFoundError(f"no item {item_id}; GET /v1/items lists them")
    return item


@catalog.get("/v1/items")
async def list_items(stock: Stock, colour: Colour | None = None, limit: int = 10) -> Items:
    """List items, optionally of one colour."""
    chosen = [i for i in stock.items.values() if colour is None or i.colour == colour]
    return Items(items=chosen[: max(limit, 0)])


@catalog.post("/v1/items", status_code=201)
async def add_item(item: NewItem, stock: Stock) -> Item:
    """Add an item; a name already taken is a conflict."""
    if any(existing.name == item.name for existing in stock.items.values()):
        raise ConflictError(f"an item named {item.name!r} exists")
    created = Item(id=max(stock.items, default=0) + 1, **item.model_dump())
    stock.items[created.id] = created
    return created


@catalog.put("/v1/items/{item_id}")
async def replace_item(item_id: int, item: NewItem, stock: Stock) -> Item:
    """Replace an item's fields."""
    if item_id not in stock.items:
        raise NotFoundError(f"no item {item_id}")
    replaced = Item(id=item_id, **item.model_dump())
    stock.items[item_id] = replaced
    return replaced


@catalog.delete("/v1/items/{item_id}")
async def remove_item(item_id: int, stock: Stock) -> None:
    """Remove an item (no error if it is gone already)."""
    stock.items.pop(item_id, None)


@catalog.get("/v1/seen")
async def seen(ctx: CallContext) -> Seen:
    """What the handler sees of the call."""
    remaining = None
    if ctx.deadline is not None:
        remaining = round((ctx.deadline - asyncio.get_running_loop().time()) * 1000)
    return Seen(
        host=ctx.header("host"),
        deadline_ms=remaining,
        idempotency_key=ctx.idempotency_key,
        peer=ctx.peer,
        user_agent=ctx.header("user-agent"),
    )


@catalog.get("/v1/count/{upto}")
async def count(upto: int, fail_at: int = -1) -> AsyncIterator[Tally]:
    """Stream ``upto`` tallies; fail (not found) after ``fail_at`` of them."""
    if upto > 1000:
        raise NotFoundError("the stream stops at 1000")
    total = 0
    for n in range(upto):
        if n == fail_at:
            raise NotFoundError(f"gone after {n}")
        total += n
        yield Tally(count=n + 1, total=total)


@catalog.post("/v1/sum")
async def add_up(notes: AsyncIterator[Tally]) -> Tally:
    """Add up a client stream of tallies."""
    count_ = total = 0
    async for note in notes:
        count_ += 1
        total += note.total
    return Tally(count=count_, total=total)


@catalog.post("/v1/chat", grpc=True)
async def chat(notes: AsyncIterator[Note]) -> AsyncIterator[Note]:
    """Echo notes (bidirectional: gRPC only)."""
    async for note in notes:
        yield note


faulty = Service("faulty")
"""Endpoints that fail or stall on purpose; the schemathesis run leaves them out."""


@faulty.get("/v1/slow", grpc=False)
async def slow(seconds: float = 0.0) -> Note:
    """Sleep, so deadlines can cut it."""
    await asyncio.sleep(min(max(seconds, 0.0), 5.0))
    return Note(text="done")


@faulty.get("/v1/broken", grpc=False)
async def broken() -> Note:
    """Fail as a bug would."""
    raise RuntimeError("secret internal detail /etc/passwd")


@faulty.get("/v1/wrong-type", grpc=False)
async def wrong_type() -> Note:
    """Return something other than the declared model."""
    result: object = {"text": "a dict, not a Note"}
    return result  # type: ignore[return-value]


class Attempts:
    """How many times the flaky endpoints ran."""

    def __init__(self) -> None:
        self.count = 0


faulty.provide(Attempts, Attempts)


@faulty.post("/v1/flaky", grpc=False)
async def flaky_post(attempts: Attempts) -> Note:
    """Fail with a retriable error, every time."""
    attempts.count += 1
    raise ServiceUnavailableError("the ledger is down; try again shortly")


@faulty.get("/v1/flaky", grpc=False)
async def flaky_get(attempts: Attempts) -> Note:
    """Fail with a retriable error, every time."""
    attempts.count += 1
    raise ServiceUnavailableError("the ledger is down; try again shortly")


class Ticker:
    """What the endless stream did: items sent, and whether it was closed."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = False


faulty.provide(Ticker, Ticker)


@faulty.get("/v1/forever", grpc=False)
async def forever(ticker: Ticker) -> AsyncIterator[Note]:
    """Stream notes until the client leaves or the deadline passes."""
    try:
        while True:
            ticker.sent += 1
            yield Note(text=f"tick {ticker.sent}")
            await asyncio.sleep(0.01)
    finally:
        ticker.closed = True
