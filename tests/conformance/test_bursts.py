"""A burst of requests far above what a backend sends at once: it queues, it does not time out.

RabbitMQ sends at most ``publish_window`` publishes unconfirmed, Redis runs at
most ``max_connections - 2`` calls at once; the rest wait their turn. These
checks shrink that limit through the URL and slow every round trip down with
the fault proxy, so the queue in front of the last request is several times
longer than ``publish_timeout`` by construction (not by the machine's speed):
a backend that counted the wait for a turn against ``publish_timeout`` fails
them, one that waits for ever ignores a request's own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tests.conformance.conftest import BACKENDS, PurgingTarget, server_target_of
from tests.conformance.test_request_reply import Answer, Ask, responder
from tests.helpers.fault_proxy import FaultProxy
from wirework.brokers import Broker, Subscription, connect
from wirework.brokers.base import GroupAdmin
from wirework.envelope import WireMessage
from wirework.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    DeadlineExceededError,
    RequestTimeoutError,
)
from wirework.service import Service

#: Seconds each chunk through the proxy waits, each way: a round trip takes at least twice this.
LATENCY = 0.03

#: How each backend is squeezed to one or two calls at a time (URL query options).
NARROW = {"redis": "max_connections=3", "rabbitmq": "publish_window=2"}


@pytest.fixture(params=[pytest.param(name, marks=BACKENDS[name].marks) for name in NARROW])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[PurgingTarget]:
    """A server backend in a namespace of its own, purged afterwards."""
    async with server_target_of(request.param) as built:
        yield built


def _narrow(server: PurgingTarget, proxy: FaultProxy, query: str) -> Broker:
    """A broker on ``server``'s namespace, through ``proxy``, with one or two calls at a time."""
    options = f"namespace={server.namespace}&{NARROW[server.backend]}&{query}"
    if server.backend == "redis":
        return connect(f"redis://127.0.0.1:{proxy.port}/0?{options}")
    return connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{options}")


async def _warm_up(caller: Service) -> None:
    """One request answered first, so the burst meets no first-use declarations (they count
    against ``publish_timeout``, as waiting for a connection does; through the slow proxy
    they take longer than it, and go on in the background), only the queue for its turns."""
    deadline = time.monotonic() + 30
    while True:
        try:
            assert (await caller.request("ask", Ask(n=1), returns=Answer, timeout=5)).n == 1
            return
        except (BrokerUnavailableError, RequestTimeoutError):
            if time.monotonic() > deadline:
                raise


def _upstream(server: PurgingTarget) -> tuple[str, int]:
    service = BACKENDS[server.backend].service
    assert service is not None
    return service[1], service[2]


async def test_a_burst_far_above_the_limit_waits_its_turn_and_every_request_is_answered(
    server: PurgingTarget,
) -> None:
    """80 requests through one or two slots, each round trip >= 60 ms: the last waits >= 2.4 s
    for its turn, well past a 1 s publish_timeout, and still every request gets its own reply."""
    count = 80
    answering = await server.open()
    async with FaultProxy(*_upstream(server)) as proxy:
        proxy.latency = LATENCY
        narrow = _narrow(server, proxy, "publish_timeout=1.0")
        caller = Service("burst-caller", broker=narrow)
        try:
            async with responder(answering), caller:
                await _warm_up(caller)
                replies = await asyncio.gather(
                    *(
                        caller.request("ask", Ask(n=n), returns=Answer, timeout=60)
                        for n in range(count)
                    )
                )
                stats = caller.request_stats
        finally:
            await narrow.aclose()
    assert [reply.n for reply in replies] == list(range(count))
    assert len({reply.by for reply in replies}) == count
    assert stats.timed_out == 0
    assert stats.sent == stats.replied == count + 1


async def test_a_request_waiting_its_turn_ends_by_its_own_deadline(
    server: PurgingTarget,
) -> None:
    """With one or two slots and 0.4 s round trips, 20 requests queue for >= 4 s; those whose
    0.5 s deadline passes first end then with RequestTimeoutError, not when their turn comes."""
    answering = await server.open()
    async with FaultProxy(*_upstream(server)) as proxy:
        narrow = _narrow(server, proxy, "publish_timeout=30")
        caller = Service("deadline-caller", broker=narrow)
        try:
            async with responder(answering), caller:
                await _warm_up(caller)
                proxy.latency = 0.2

                async def ask(n: int) -> float:
                    started = time.monotonic()
                    with contextlib.suppress(RequestTimeoutError):
                        await caller.request("ask", Ask(n=n), returns=Answer, timeout=0.5)
                    return time.monotonic() - started

                elapsed = await asyncio.gather(*(ask(n) for n in range(20)))
                stats = caller.request_stats
        finally:
            await narrow.aclose()
    assert max(elapsed) < 2.5, sorted(elapsed)
    assert stats.timed_out >= 10


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/?publish_window=0", "publish_window"),
        ("amqp://guest:guest@127.0.0.1:5672/?publish_window=many", "publish_window"),
        ("redis://127.0.0.1:6379/0?max_connections=1", "max_connections"),
    ],
)
def test_a_limit_below_one_call_at_a_time_is_refused_by_name(url: str, option: str) -> None:
    """A window or pool that could never send anything is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=option):
        connect(url)


async def test_a_publish_that_missed_its_turn_stored_nothing(server: PurgingTarget) -> None:
    """30 publishes through one or two slots, each with a 0.5 s deadline of its own and 0.4 s
    round trips: those that end with DeadlineExceededError were never sent, so exactly the
    ones that returned are stored, none of the others."""
    keeper = await server.open()
    assert isinstance(keeper, GroupAdmin)
    await keeper.declare_group(Subscription(topic="burst", group="keep"))
    async with FaultProxy(*_upstream(server)) as proxy:
        narrow = _narrow(server, proxy, "publish_timeout=30")
        try:
            warm = WireMessage(headers={"ce-id": "warm"}, body=b"{}")
            await narrow.publish("burst", warm)  # first-use declarations, at full speed
            proxy.latency = 0.2
            deadline = (datetime.now(UTC) + timedelta(seconds=0.5)).isoformat()

            async def publish(n: int) -> BaseException | None:
                headers = {"ce-id": f"m{n}", "ce-deadline": quote(deadline)}
                try:
                    await narrow.publish("burst", WireMessage(headers=headers, body=b"{}"))
                except DeadlineExceededError as exc:
                    return exc
                return None

            outcomes = await asyncio.gather(*(publish(n) for n in range(30)))
        finally:
            await narrow.aclose()
    stored = {f"m{n}" for n, outcome in enumerate(outcomes) if outcome is None}
    assert 0 < len(stored) < 30, outcomes
    expected = stored | {"warm"}
    seen: set[str] = set()
    deliveries = keeper.subscribe(Subscription(topic="burst", group="keep", prefetch=64))
    try:
        while True:
            try:  # once all expected arrived, one more second for anything that should not
                async with asyncio.timeout(1.0 if seen >= expected else 10.0):
                    delivery = await anext(deliveries)
            except TimeoutError:
                break
            seen.add(delivery.message.message_id or "")
            await delivery.ack()
    finally:
        await deliveries.aclose()
    assert seen == expected
