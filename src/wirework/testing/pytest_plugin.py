"""pytest fixtures for testing code built on wirework, loaded by its ``pytest11`` entry point.

* ``wirework_clock``: a ``ManualClock``; time moves only when the test says so.
* ``memory_broker``: a ``MemoryBroker`` on that clock, closed after the test.
* ``service_harness``: makes a ``ServiceHarness`` on both::

      async def test_order_is_placed(service_harness: HarnessFactory) -> None:
          async with service_harness(orders, inventory) as h:
              await h.send("orders.place", PlaceOrder(order_id="o-1"))
              await h.settle()

The async fixture needs pytest-asyncio (or anyio's plugin); this module loads
without either, so installing wirework never breaks a project's test run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from wirework.brokers.memory import MemoryBroker
from wirework.clock import ManualClock
from wirework.service import Service
from wirework.testing.harness import HarnessFactory, ServiceHarness


def _async_fixture(function: Callable[..., AsyncIterator[object]]) -> object:
    """pytest-asyncio's fixture decorator if it is installed, else pytest's.

    pytest-asyncio's strict mode runs only the async fixtures it marked itself,
    and anyio's plugin runs plain ones; importing it here keeps it optional.
    """
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - depends on the environment
        return pytest.fixture(function)
    return pytest_asyncio.fixture(function)


@pytest.fixture
def wirework_clock() -> ManualClock:
    """A manual clock: retries, leases, delays and deadlines wait for ``advance``."""
    return ManualClock()


@_async_fixture
async def memory_broker(wirework_clock: ManualClock) -> AsyncIterator[MemoryBroker]:
    """An in-process broker on ``wirework_clock``, closed after the test."""
    async with MemoryBroker(clock=wirework_clock) as broker:
        yield broker


@pytest.fixture
def service_harness(wirework_clock: ManualClock, memory_broker: MemoryBroker) -> HarnessFactory:
    """``service_harness(svc, ...)``: a harness on the test's clock and broker."""

    def harness(*services: Service) -> ServiceHarness:
        return ServiceHarness(*services, clock=wirework_clock, broker=memory_broker)

    return harness
