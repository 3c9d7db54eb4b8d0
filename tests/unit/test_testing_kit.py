"""The public test kit, used as a user would: services under ServiceHarness via the fixtures.

Two module-level services, as an application defines them; each test swaps
their dependencies for fakes and drives time with the harness's manual clock,
so backoffs of seconds and request deadlines take no real time.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from wirework import DeadLetterReason, RetryPolicy
from wirework.brokers.memory import MemoryBroker
from wirework.clock import ManualClock
from wirework.errors import ConfigurationError, RemoteError, RequestTimeoutError
from wirework.service import Context, Service
from wirework.testing import HarnessFactory, NotSettledError, ServiceHarness


class PlaceOrder(BaseModel):
    order_id: str
    sku: str
    quantity: int = 1


class OrderPlaced(BaseModel):
    order_id: str
    reservation: str


class Reserve(BaseModel):
    sku: str
    quantity: int


class Reserved(BaseModel):
    reservation: str


class Payments:
    """The real payment client: tests must never reach it."""

    async def charge(self, order_id: str) -> None:
        raise AssertionError("the real payment provider was called from a test")


class FakePayments(Payments):
    """Records charges; fails the first ``failures`` of them, as a flaky provider would."""

    def __init__(self, *, failures: int = 0) -> None:
        self.charged: list[str] = []
        self.attempts = 0
        self._failures = failures

    async def charge(self, order_id: str) -> None:
        self.attempts += 1
        if self.attempts <= self._failures:
            raise ConnectionError("payment provider unavailable")
        self.charged.append(order_id)


class Stock:
    def __init__(self, levels: dict[str, int] | None = None) -> None:
        self.levels = dict(levels or {})


orders = Service("orders")
orders.provide(Payments, Payments)
inventory = Service("inventory")
inventory.provide(Stock, Stock)


@orders.consume("orders.place", retry=RetryPolicy(max_attempts=3, base_delay=10.0, jitter=0))
async def place(command: PlaceOrder, ctx: Context, payments: Payments) -> None:
    reserve = Reserve(sku=command.sku, quantity=command.quantity)
    reserved = await ctx.request("inventory.reserve", reserve, returns=Reserved, timeout=2.0)
    await payments.charge(command.order_id)
    placed = OrderPlaced(order_id=command.order_id, reservation=reserved.reservation)
    await ctx.publish("orders.events", placed)


@inventory.respond("inventory.reserve")
async def reserve_stock(request: Reserve, stock: Stock) -> Reserved:
    if stock.levels.get(request.sku, 0) < request.quantity:
        raise LookupError(f"only {stock.levels.get(request.sku, 0)} {request.sku} left")
    stock.levels[request.sku] -= request.quantity
    return Reserved(reservation=f"r-{request.sku}-{stock.levels[request.sku]}")


async def test_an_order_is_placed_and_every_hop_names_its_cause(
    service_harness: HarnessFactory,
) -> None:
    """The event, the request and its reply are caused by the hop before and share one flow."""
    async with service_harness(orders, inventory) as h:
        payments = FakePayments()
        orders.override(Payments, payments)
        inventory.override(Stock, Stock({"kettle": 2}))
        command = await h.send("orders.place", PlaceOrder(order_id="o-1", sku="kettle"))
        await h.settle()

        assert h.published("orders.events", OrderPlaced) == [
            OrderPlaced(order_id="o-1", reservation="r-kettle-1")
        ]
        [request] = h.envelopes("inventory.reserve")
        [reply] = [p.envelope for p in h.captured if p.service == "inventory"]
        [placed] = h.envelopes("orders.events")
        assert (request.causationid, reply.causationid) == (command.id, request.id)
        assert (placed.causationid, placed.source) == (command.id, "/orders")
        assert {e.correlationid for e in h.envelopes()} == {command.id}
        assert payments.charged == ["o-1"]


async def test_a_retry_ten_seconds_out_runs_when_the_clock_is_advanced(
    service_harness: HarnessFactory, wirework_clock: ManualClock
) -> None:
    """With base_delay=10 s the retry runs after advance(11), and no real time passes."""
    started = time.perf_counter()
    async with service_harness(orders, inventory) as h:
        payments = FakePayments(failures=1)
        orders.override(Payments, payments)
        inventory.override(Stock, Stock({"kettle": 5}))
        await h.send("orders.place", PlaceOrder(order_id="o-1", sku="kettle"))
        await h.settle()
        assert (payments.attempts, h.published("orders.events", OrderPlaced)) == (1, [])

        await h.advance(9.9)
        assert payments.attempts == 1, "the backoff has not run out yet"
        await h.advance(1.1)
        assert payments.charged == ["o-1"]
        assert len(h.published("orders.events", OrderPlaced)) == 1
    assert wirework_clock.monotonic() == pytest.approx(11.0)
    assert time.perf_counter() - started < 1.0


async def test_a_handler_waiting_on_its_request_deadline_settles_and_times_out_on_advance(
    service_harness: HarnessFactory,
) -> None:
    """Without inventory each attempt waits 2 s for its reply; one advance runs all three."""
    async with service_harness(orders) as h:
        orders.override(Payments, FakePayments())
        await h.send("orders.place", PlaceOrder(order_id="o-1", sku="kettle"))
        await h.settle()  # the handler now waits on the clock, which counts as settled
        assert await h.dead_letters("orders.place") == []

        # Attempts at t=0, 12 and 34: each waits 2 s for a reply, then backs off 10 s, 20 s.
        await h.advance(35.9)
        assert await h.dead_letters("orders.place") == []
        await h.advance(0.1)
        [dead] = await h.dead_letters("orders.place")
        assert (dead.reason, dead.attempts) == (DeadLetterReason.MAX_DELIVERIES, 3)
        assert dead.error is not None
        assert dead.error.error_type == "wirework.errors.RequestTimeoutError"
        assert len(h.envelopes("inventory.reserve")) == 3


async def test_requests_get_replies_remote_errors_and_timeouts(
    service_harness: HarnessFactory, wirework_clock: ManualClock
) -> None:
    """A reply, a responder's failure as RemoteError, and silence as a timeout on the clock."""
    async with service_harness(inventory) as h:
        inventory.override(Stock, Stock({"mug": 1}))
        reserved = await h.request(
            "inventory.reserve", Reserve(sku="mug", quantity=1), returns=Reserved
        )
        assert reserved == Reserved(reservation="r-mug-0")

        with pytest.raises(RemoteError, match="only 0 mug left"):
            await h.request("inventory.reserve", Reserve(sku="mug", quantity=1), returns=Reserved)
        assert wirework_clock.monotonic() == 0.0, "answered requests take no time"

        with pytest.raises(RequestTimeoutError):
            await h.request(
                "pricing.quote", Reserve(sku="mug", quantity=1), returns=Reserved, timeout=3.0
            )
        assert wirework_clock.monotonic() == pytest.approx(3.0)


async def test_a_delayed_message_waits_for_the_clock(service_harness: HarnessFactory) -> None:
    """A command sent with delay=30 is handled once 30 s have passed, not before."""
    async with service_harness(orders, inventory) as h:
        payments = FakePayments()
        orders.override(Payments, payments)
        inventory.override(Stock, Stock({"kettle": 1}))
        sent = await h.send("orders.place", PlaceOrder(order_id="o-9", sku="kettle"), delay=30)
        await h.settle()
        await h.advance(29.5)
        assert payments.charged == []
        await h.advance(0.5)
        assert payments.charged == ["o-9"]
        assert [p.delay for p in h.captured if p.envelope.id == sent.id] == [30]


async def test_a_handler_that_outlives_its_lease_loses_the_message_to_a_new_attempt(
    service_harness: HarnessFactory,
) -> None:
    """At 30 s the lease runs out and attempt 2 takes over; attempt 1's late ack is ignored."""
    slow = Service("slow")
    started: list[tuple[int, float]] = []

    @slow.consume("slow.work", lease_timeout=30.0, concurrency=2)
    async def work(command: PlaceOrder, ctx: Context) -> None:
        started.append((ctx.attempt, ctx.service.clock.monotonic()))
        if ctx.attempt == 1:
            await ctx.service.clock.sleep(45.0)

    async with service_harness(slow) as h:
        await h.send("slow.work", PlaceOrder(order_id="o-1", sku="mug"))
        await h.settle()
        await h.advance(29.9)
        assert started == [(1, 0.0)]
        await h.advance(0.1)
        assert started == [(1, 0.0), (2, 30.0)]
        await h.advance(15.0)
        assert h.broker.stale_settles == 1
        assert [row.backlog for row in await h.broker.stats() if row.topic == "slow.work"] == [0]


async def test_overrides_broker_and_clock_are_given_back_on_exit(
    memory_broker: MemoryBroker,
) -> None:
    """A module-level service leaves one harness as it entered it, ready for the next test."""
    service = Service("billing", broker="memory://")

    @service.consume("billing.charge")
    async def charge(command: PlaceOrder, payments: Payments) -> None:
        await payments.charge(command.order_id)

    service.provide(Payments, FakePayments)
    clock = service.clock
    first = FakePayments()
    async with ServiceHarness(service, broker=memory_broker) as h:
        service.override(Payments, first)
        await h.send("billing.charge", PlaceOrder(order_id="o-1", sku="mug"))
        await h.settle()
    async with ServiceHarness(service) as h:
        await h.send("billing.charge", PlaceOrder(order_id="o-2", sku="mug"))
        await h.settle()
    assert first.charged == ["o-1"], "the second harness got the provider's payments again"
    assert service.clock is clock
    async with service.broker as own:
        assert own is not memory_broker


async def test_settle_names_a_handler_that_never_finishes(service_harness: HarnessFactory) -> None:
    """A handler waiting on something other than the clock is reported, not waited for."""
    stuck = Service("stuck")
    release = asyncio.Event()

    @stuck.consume("stuck.work")
    async def work(command: PlaceOrder) -> None:
        await release.wait()

    async with service_harness(stuck) as h:
        await h.send("stuck.work", PlaceOrder(order_id="o-1", sku="mug"))
        with pytest.raises(NotSettledError, match=r"stuck\.work/stuck\.work: 0 ready, 1 in flight"):
            await h.settle()
        release.set()
        await h.settle()


async def test_a_broker_on_another_clock_is_refused(memory_broker: MemoryBroker) -> None:
    """advance() could never move that broker's delays, so the harness says so at once."""
    with pytest.raises(ConfigurationError, match="another clock"):
        ServiceHarness(orders, clock=ManualClock(), broker=memory_broker)


def test_the_fixtures_come_from_the_installed_plugin(pytestconfig: pytest.Config) -> None:
    """The pytest11 entry point registers the plugin, so users need no conftest."""
    plugin = pytestconfig.pluginmanager.get_plugin("wirework")
    assert plugin is not None
    assert plugin.__name__ == "wirework.testing.pytest_plugin"
