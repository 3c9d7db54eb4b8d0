"""``wirework.runner`` without processes: loading targets, counts, the live table, stopping.

The pure parts (summary cadence, restart backoff, the table) get hand-made
inputs and no clock; the runtime runs real services on the memory broker, with
signal handling off, and is stopped through the same calls a signal makes.
"""

from __future__ import annotations

import asyncio
import io
import random
import sys
import textwrap
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import BaseModel
from rich.console import Console

from wirework.brokers import Broker, Subscription, connect
from wirework.brokers.memory import MemoryBroker, MemoryDelivery
from wirework.cli.run import SummaryLog, live_table
from wirework.envelope import decode_wire
from wirework.errors import BrokerClosedError, ConfigurationError
from wirework.runner import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FORCED,
    EXIT_OK,
    HandlerCounts,
    RequestCounts,
    Runner,
    Snapshot,
    load_service,
    load_services,
)
from wirework.service import Service
from wirework.supervisor import RestartBackoff
from wirework.testing.conformance import wait_until


class Job(BaseModel):
    n: int


# -- loading targets -----------------------------------------------------------------


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write a module into a directory on ``sys.path``; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


SERVICES = """
    from wirework.service import Service

    svc = Service("loaded")
    other = Service("other")

    def factory():
        return Service("made")

    def needs_args(name):
        return Service(name)

    async def async_factory():
        return Service("never")

    def wrong():
        return 42

    class Holder:
        inner = Service("inner")
"""


@pytest.mark.parametrize(
    ("attribute", "name"),
    [("svc", "loaded"), ("factory", "made"), ("Holder.inner", "inner")],
)
def test_a_target_names_a_service_a_factory_or_a_dotted_attribute(
    module: Callable[[str, str], str], attribute: str, name: str
) -> None:
    """A target may be a Service, a no-argument factory, or a dotted path to one."""
    mod = module("targets_ok", SERVICES)
    assert load_service(f"{mod}:{attribute}").name == name


@pytest.mark.parametrize(
    ("attribute", "says"),
    [
        ("needs_args", "needs arguments (name)"),
        ("async_factory", "is an async function"),
        ("wrong", "returned an int, not a wirework Service"),
        ("Holder", "is the class Holder, not a wirework Service"),
        ("missing", "Services there: targets_bad:other, targets_bad:svc"),
    ],
)
def test_a_target_that_is_no_service_says_what_to_write(
    module: Callable[[str, str], str], attribute: str, says: str
) -> None:
    """Every wrong target is a ConfigurationError naming it and what to point at instead."""
    mod = module("targets_bad", SERVICES)
    with pytest.raises(ConfigurationError, match="targets_bad") as caught:
        load_service(f"{mod}:{attribute}")
    assert says in str(caught.value)


def test_a_module_that_fails_to_import_is_named_with_its_error(
    module: Callable[[str, str], str],
) -> None:
    """An exception while importing the user's module names the module and the exception."""
    mod = module("targets_broken", "import os\nraise RuntimeError('no config file')\n")
    with pytest.raises(ConfigurationError) as caught:
        load_service(f"{mod}:svc")
    assert "importing 'targets_broken' raised RuntimeError: no config file" in str(caught.value)


def test_one_service_listed_twice_is_refused(module: Callable[[str, str], str]) -> None:
    """Two targets resolving to one service name would share its groups and its counts."""
    mod = module("targets_twice", SERVICES)
    with pytest.raises(ConfigurationError, match="list each service once"):
        load_services([f"{mod}:svc", f"{mod}:svc"])


# -- counts, summaries, backoff, the table ---------------------------------------------


def snapshot(handled: int, in_flight: int = 0, state: str = "running") -> Snapshot:
    return Snapshot(
        state=state,  # type: ignore[arg-type]
        grace=5.0,
        handlers=(
            HandlerCounts("orders", "consume", "orders.place", "orders.place", "place", handled),
            HandlerCounts(
                "orders", "subscribe", "stock", "orders", "on_stock", 1, 2, 3, 4, in_flight
            ),
        ),
        requests=(RequestCounts("orders", sent=7, replied=6, timed_out=1),),
    )


def test_summary_lines_come_on_change_at_most_once_per_interval() -> None:
    """The first change prints at once; later ones wait out the interval; no change, no line."""
    log = SummaryLog(every=5.0)
    first = log.lines(snapshot(handled=1), now=100.0)
    assert first == [
        "orders: handled=2 failed=2 retried=3 dead_lettered=4 in_flight=0 "
        "requests_sent=7 replied=6 timed_out=1 remote_errors=0"
    ]
    assert log.lines(snapshot(handled=1), now=200.0) == [], "unchanged counts print nothing"
    assert log.lines(snapshot(handled=5), now=204.0) != [], "a change after quiet prints at once"
    assert log.lines(snapshot(handled=6), now=205.0) == [], "within the interval: wait"
    assert log.lines(snapshot(handled=6), now=209.0) != [], "the interval is over"
    assert log.lines(snapshot(handled=9, state="stopped"), now=999.0) == []


def test_restart_backoff_grows_caps_and_starts_over_after_a_healthy_run() -> None:
    """Quick deaths back off exponentially to a cap; a long run forgives the past."""
    backoff = RestartBackoff()
    rng = random.Random(1)
    quick = [backoff.delay(uptime=0.1, rng=rng) for _ in range(10)]
    assert 0.4 <= quick[0] <= 0.6
    assert quick[3] > quick[2] > quick[1] > quick[0]
    assert max(quick) <= 30.0 * 1.2
    assert backoff.delay(uptime=60.0, rng=rng) <= 0.6


def test_live_table_has_a_row_per_consumer_and_the_request_counts() -> None:
    """The live view shows every consumer's counters and every service's requests."""
    out = Console(file=io.StringIO(), width=200, color_system=None)
    out.print(live_table(snapshot(handled=41, in_flight=3, state="stopping")))
    text = out.file.getvalue()  # type: ignore[attr-defined]
    lines = [line.split() for line in text.splitlines()]
    assert "stopping" in text
    assert "in-flight handlers get 5.0 s" in text
    assert ["orders", "consume", "orders.place", "place", "41", "0", "0", "0", "0"] in lines
    assert ["orders", "subscribe", "stock", "orders", "on_stock", "1", "2", "3", "4", "3"] in lines
    assert ["orders", "7", "6", "1", "0"] in lines


# -- the runtime on the memory broker ---------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with connect("memory://") as memory:
        yield memory


def jobs_service(broker: Broker, handle: Callable[[int], Awaitable[None]]) -> Service:
    service = Service("unit-jobs", broker=broker)

    @service.consume("jobs", concurrency=2, prefetch=4)
    async def work(job: Job) -> None:
        await handle(job.n)

    return service


async def test_a_graceful_stop_finishes_in_flight_work_and_keeps_the_totals(
    broker: Broker,
) -> None:
    """Stopping lets running handlers finish, returns 0, and the counts survive the stop."""
    done: list[int] = []
    release = asyncio.Event()

    async def handle(n: int) -> None:
        await release.wait()
        done.append(n)

    service = jobs_service(broker, handle)
    for n in range(3):
        await service.send("jobs", Job(n=n))
    runner = Runner([service], grace=5.0, handle_signals=False, abandon_after=None)
    serving = asyncio.create_task(runner.serve())
    await wait_until(lambda: runner.snapshot().in_flight == 2)

    runner.request_stop("test")
    release.set()
    assert await serving == EXIT_OK
    assert len(done) == 2, "only the two running handlers finish; the third was never started"
    assert runner.snapshot().handlers[0].handled == 2, "totals read after the stop"


async def test_after_grace_handlers_are_cancelled_and_their_messages_handed_back(
    broker: Broker,
) -> None:
    """A handler still running when grace is over is cancelled; its message comes back."""
    stuck = jobs_service(broker, lambda n: asyncio.sleep(60))
    await stuck.send("jobs", Job(n=7))
    runner = Runner([stuck], grace=0.05, handle_signals=False, abandon_after=None)
    serving = asyncio.create_task(runner.serve())
    await wait_until(lambda: runner.snapshot().in_flight == 1)
    runner.request_stop("test")
    assert await serving == EXIT_OK

    assert await _redelivered(broker) == 7


async def test_a_forced_stop_cancels_at_once_and_exits_130(broker: Broker) -> None:
    """A forced stop (a second signal) does not wait out grace, and still hands work back."""
    stuck = jobs_service(broker, lambda n: asyncio.sleep(60))
    await stuck.send("jobs", Job(n=9))
    runner = Runner([stuck], grace=60.0, handle_signals=False, abandon_after=None)
    serving = asyncio.create_task(runner.serve())
    await wait_until(lambda: runner.snapshot().in_flight == 1)
    runner.request_stop("first")
    runner.force_stop("second")
    assert await asyncio.wait_for(serving, 5) == EXIT_FORCED

    assert await _redelivered(broker) == 9


async def _redelivered(broker: Broker) -> int:
    deliveries = broker.subscribe(Subscription(topic="jobs", group="jobs"))
    try:
        delivery = await asyncio.wait_for(anext(deliveries), 5)
        await delivery.ack()
        return decode_wire(delivery.message).decode(Job).n
    finally:
        await deliveries.aclose()


class Unreachable(MemoryBroker):
    """A broker whose topic ``other`` is gone for good: at the first fetch, or at once.

    Not retriable (a consumer subscribes again after a retriable error).
    """

    def __init__(self, *, at_once: bool) -> None:
        super().__init__()
        self.at_once = at_once

    def subscribe(self, subscription: Subscription) -> AsyncGenerator[MemoryDelivery, None]:
        if subscription.topic != "other":
            return super().subscribe(subscription)
        if self.at_once:
            raise BrokerClosedError("broker gone")
        return self._down()

    async def _down(self) -> AsyncGenerator[MemoryDelivery, None]:
        raise BrokerClosedError("broker gone")
        yield  # an async generator, as subscribe() returns


@pytest.mark.parametrize(
    "at_once",
    [
        pytest.param(False, id="at-first-fetch"),
        # Consumer.run calls subscribe() before its try/finally, so its stop()
        # then waits forever; the runner's stop deadline has to end it.
        pytest.param(True, id="in-subscribe"),
    ],
)
async def test_a_failing_service_stops_the_others_and_exits_1(
    broker: Broker, at_once: bool
) -> None:
    """When one service's consumer dies, the runner stops every service and returns 1."""
    healthy = jobs_service(broker, lambda n: asyncio.sleep(0))
    failing = Service("unit-failing", broker=Unreachable(at_once=at_once))

    @failing.consume("other")
    async def work(job: Job) -> None:
        return None

    runner = Runner([healthy, failing], grace=0.2, handle_signals=False, abandon_after=None)
    assert await asyncio.wait_for(runner.serve(), 5) == EXIT_FAILED


async def test_a_service_without_a_broker_is_a_configuration_error(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that cannot start for its configuration returns 2: a restart cannot fix it."""
    monkeypatch.delenv("WIREWORK_BROKER", raising=False)
    healthy = jobs_service(broker, lambda n: asyncio.sleep(0))
    homeless = Service("unit-homeless")
    runner = Runner([healthy, homeless], grace=1.0, handle_signals=False, abandon_after=None)
    assert await asyncio.wait_for(runner.serve(), 5) == EXIT_CONFIG
