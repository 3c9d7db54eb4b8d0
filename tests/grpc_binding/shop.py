"""A service with every gRPC shape the binding serves, for the tests in this folder.

``wirework proto tests.grpc_binding.shop:svc`` prints its contract; the Node client
in ``node/`` calls it through that contract.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, Field

from wirework.errors import ConflictError, NotFoundError, ServiceUnavailableError
from wirework.service import CallContext, Service

MISSING_ORDER = uuid.UUID(int=404)


class Status(enum.StrEnum):
    OPEN = "open"
    SHIPPED = "shipped"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Line(BaseModel):
    sku: str = Field(min_length=1)
    qty: int = Field(gt=0)


class Address(BaseModel):
    street: str
    city: str


class PlaceOrder(BaseModel):
    lines: list[Line]
    ship_to: Address | None = None
    priority: Priority = Priority.LOW
    note: str | None = None
    tags: dict[str, str] = {}


class Order(BaseModel):
    id: uuid.UUID
    status: Status
    lines: list[Line]
    total: decimal.Decimal
    placed_at: datetime.datetime
    ship_to: Address | None = None
    priority: Priority = Priority.LOW
    note: str | None = None
    tags: dict[str, str] = {}
    by_sku: dict[str, Line] = {}
    channel: Literal["web", "grpc"] = "grpc"
    idempotency_key: str | None = None


class OrderEvent(BaseModel):
    order_id: str
    seq: int
    status: Status


class Summary(BaseModel):
    lines: int
    units: int


class Blob(BaseModel):
    data: str


class Size(BaseModel):
    chars: int


class DeadlineSeen(BaseModel):
    remaining: float | None


class Attempts(BaseModel):
    count: int


class OutOfStockError(ConflictError):
    """A user-defined error: the client rebuilds it as itself."""


svc = Service("grpc-shop")
PLACED_AT = datetime.datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=datetime.UTC)
seen_deadlines: list[float | None] = []
"""What ``Slow`` saw as ``ctx.deadline - loop.time()``, appended per call."""
slow_cancelled: list[float] = []
"""Time left to the deadline when grpc cancelled ``Slow`` (negative: after it)."""


@svc.get("/v1/orders/{order_id}")
async def get_order(order_id: uuid.UUID, verbose: bool = False) -> Order:
    """Read one order."""
    if order_id == MISSING_ORDER:
        raise NotFoundError(f"no order {order_id}; list orders to find its id")
    note = "verbose" if verbose else None
    return Order(
        id=order_id,
        status=Status.SHIPPED,
        lines=[Line(sku="apple", qty=2)],
        total=decimal.Decimal("3.10"),
        placed_at=PLACED_AT,
        note=note,
    )


@svc.post("/v1/orders")
async def place_order(order: PlaceOrder, ctx: CallContext) -> Order:
    """Place an order (an Idempotency-Key in the metadata is echoed back)."""
    if any(line.sku == "unobtainium" for line in order.lines):
        raise OutOfStockError("unobtainium is out of stock; order something else")
    if any(line.sku == "boom" for line in order.lines):
        raise RuntimeError("secret internal detail")
    return Order(
        id=uuid.UUID(int=1),
        status=Status.OPEN,
        lines=order.lines,
        total=decimal.Decimal(sum(line.qty for line in order.lines)) / 4,
        placed_at=PLACED_AT,
        ship_to=order.ship_to,
        priority=order.priority,
        note=order.note,
        tags=order.tags,
        by_sku={line.sku: line for line in order.lines},
        idempotency_key=ctx.idempotency_key,
    )


# Service.get's TypeVar is bound to Awaitable-returning callables, which an async
# generator is not (reported to the lead); the endpoint itself is declared correctly.
@svc.get("/v1/orders/{order_id}/events")
async def watch(order_id: str, count: int = 3) -> AsyncIterator[OrderEvent]:
    """Stream an order's events; fails after ``count`` events when count is over 100."""
    for seq in range(min(count, 100)):
        yield OrderEvent(order_id=order_id, seq=seq, status=Status.OPEN)
    if count > 100:
        raise NotFoundError(f"order {order_id} has only 100 events")


@svc.post("/v1/uploads")
async def upload(lines: AsyncIterator[Line]) -> Summary:
    """Count what a client stream sent."""
    count = units = 0
    async for line in lines:
        count += 1
        units += line.qty
    return Summary(lines=count, units=units)


@svc.post("/v1/echo")
async def chat(lines: AsyncIterator[Line]) -> AsyncIterator[Line]:
    """Echo each line back with twice the quantity."""
    async for line in lines:
        yield Line(sku=line.sku, qty=line.qty * 2)


@svc.delete("/v1/orders/{order_id}")
async def cancel(order_id: str) -> None:
    """Cancel an order (no content)."""


@svc.get("/v1/slow")
async def slow(ctx: CallContext) -> DeadlineSeen:
    """Record the deadline it was given, then wait far past it."""
    loop = asyncio.get_running_loop()
    seen_deadlines.append(None if ctx.deadline is None else ctx.deadline - loop.time())
    if ctx.deadline is None:
        return DeadlineSeen(remaining=None)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        slow_cancelled.append(ctx.deadline - loop.time())
        raise
    return DeadlineSeen(remaining=ctx.deadline - loop.time())


@svc.post("/v1/size")
async def size(blob: Blob) -> Size:
    """How long the string sent was (the oversized-message test sends 5 MiB)."""
    return Size(chars=len(blob.data))


attempts: dict[str, int] = {}
"""Calls per key to ``Flaky`` and ``FlakyPost``."""


def _attempt(key: str, failures: int) -> Attempts:
    count = attempts[key] = attempts.get(key, 0) + 1
    if count <= failures:
        raise ServiceUnavailableError(f"attempt {count} for {key!r} fails on purpose")
    return Attempts(count=count)


@svc.get("/v1/flaky/{key}")
async def flaky(key: str, failures: int = 1) -> Attempts:
    """Fail (UNAVAILABLE, retriable) the first ``failures`` calls for ``key``."""
    return _attempt(key, failures)


@svc.post("/v1/flaky/{key}")
async def flaky_post(key: str, failures: int = 1) -> Attempts:
    """As Flaky, but a POST: only retried with an Idempotency-Key."""
    return _attempt(key, failures)
