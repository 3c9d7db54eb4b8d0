"""The client side of the connection-loss fault tests: publishers, a consumer, their ledger.

The server backends' fault tests (Redis, RabbitMQ, NATS) run the ledger
workload of RELIABILITY.md §2.0 inside the test process and judge it by what
the clients saw, never by the broker's numbers. ``Ledger`` keeps those
observations in memory (the workers of the SQLite tests write theirs to
``wirework.testing.ledger`` files instead) and judges them with the same
``LedgerCheck``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from tests.helpers import harness
from wirework.brokers.base import Broker, GroupAdmin, Inspectable, Subscription
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import (
    BrokerBusyError,
    BrokerError,
    BrokerUnavailableError,
    PublishOutcomeUnknownError,
)
from wirework.testing.conformance import wait_until
from wirework.testing.ledger import LedgerCheck

TOPIC = "ledger"
GROUP = "ledger"
ENTRY_TYPE = "ledger.entry"

#: Lease of the consumer (RELIABILITY.md §2.0 asks for ack_wait = 1 s).
LEASE = 1.0

#: Hard deadline of a drain phase, far above what a passing run needs.
DRAIN_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Entry(BaseModel):
    """The body of every ledger message."""

    id: str


def entry(message_id: str) -> WireMessage:
    """A binary-mode CloudEvent whose id (``ce-id``) and body name ``message_id``."""
    envelope = Envelope.new(ENTRY_TYPE, Entry(id=message_id), source="tests", id=message_id)
    return encode_binary(envelope)


@dataclass
class Ledger:
    """What the clients of one test saw: each publish's outcome, and each id consumed.

    Attributes:
        invoked: every id a publish was started for, recorded before it was sent.
        ok: ids whose publish returned, with the monotonic time it returned.
        fail: ids whose publish failed definitely (nothing stored), with how long it took.
        info: ids whose publish raised ``PublishOutcomeUnknownError``, with its message.
        consumed: how many times each id reached the consumer.
        slowest_ok: the longest a successful publish took, in seconds.
    """

    invoked: set[str] = field(default_factory=set)
    ok: dict[str, float] = field(default_factory=dict)
    fail: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    consumed: Counter[str] = field(default_factory=Counter)
    slowest_ok: float = 0.0

    def check(self) -> LedgerCheck:
        """The §2.0 counts, a message counting as effected once it reached the consumer.

        An invocation without an outcome (in flight when the publishers
        stopped) is indeterminate, like an ``info``.
        """
        return LedgerCheck(
            attempted=frozenset(self.invoked),
            acked=frozenset(self.ok),
            failed=frozenset(self.fail),
            indeterminate=frozenset(self.invoked - self.ok.keys() - self.fail.keys()),
            invocations=Counter(self.consumed),
            effects=Counter(self.consumed),
            dead_lettered=Counter(),
        )


def report(test: str, ledger: Ledger, **measured: float | int) -> dict[str, int]:
    """Print the ledger's counts (``pytest -rP`` shows them) and return them."""
    result = ledger.check()
    harness.report(
        test,
        result,
        unknown_outcome_errors=len(ledger.info),
        slowest_ok=ledger.slowest_ok,
        **measured,
    )
    return result.counts()


async def publish_forever(
    broker: Broker, ledger: Ledger, name: str, *, interval: float = 0.002
) -> None:
    """Publish ids ``<name>-<n>`` one after another until cancelled, recording each outcome.

    Any error other than the ones ``publish`` documents for a lost connection
    ends the task (and the test's task group) instead of being counted.
    """
    for n in itertools.count():
        message_id = f"{name}-{n}"
        began = time.monotonic()
        ledger.invoked.add(message_id)
        try:
            await broker.publish(TOPIC, entry(message_id))
        except PublishOutcomeUnknownError as exc:
            ledger.info[message_id] = str(exc)  # sent, then the link broke: maybe stored
            await asyncio.sleep(0.01)
        except (BrokerUnavailableError, BrokerBusyError):
            ledger.fail[message_id] = time.monotonic() - began  # the contract: nothing stored
            await asyncio.sleep(0.01)
        else:
            returned = time.monotonic()
            ledger.ok[message_id] = returned
            ledger.slowest_ok = max(ledger.slowest_ok, returned - began)
        await asyncio.sleep(interval)


async def consume_forever(broker: Broker, ledger: Ledger) -> None:
    """Take every delivery, note its id, ack it; a failed ack brings the message back later."""
    subscription = Subscription(topic=TOPIC, group=GROUP, lease_timeout=LEASE, prefetch=20)
    async for delivery in broker.subscribe(subscription):
        ledger.consumed[delivery.message.message_id or "-"] += 1
        with contextlib.suppress(BrokerError):
            await delivery.ack()


class Workload:
    """A consumer and two publishers; the publishers stop first, the consumer drains."""

    def __init__(self, publisher: Broker, consumer: Broker, ledger: Ledger) -> None:
        self.publisher = publisher
        self.consumer = consumer
        self.ledger = ledger
        self._tasks: asyncio.TaskGroup | None = None
        self._publishing: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Workload]:
        assert isinstance(self.consumer, GroupAdmin)
        await self.consumer.declare_group(Subscription(topic=TOPIC, group=GROUP))
        async with asyncio.TaskGroup() as tasks:
            consuming = tasks.create_task(consume_forever(self.consumer, self.ledger))
            self._publishing = [
                tasks.create_task(publish_forever(self.publisher, self.ledger, name))
                for name in ("p0", "p1")
            ]
            self._tasks = tasks
            try:
                yield self
            finally:
                for task in [*self._publishing, consuming]:
                    task.cancel()

    def add_publisher(self, name: str) -> None:
        """Another publisher, started now (say, during an outage)."""
        assert self._tasks is not None
        task = self._tasks.create_task(publish_forever(self.publisher, self.ledger, name))
        self._publishing.append(task)

    async def stop_publishing_and_drain(self) -> None:
        """The final phase: every publish that returned is consumed, and the backlog empties."""
        for task in self._publishing:
            task.cancel()
        await asyncio.wait(self._publishing)
        ledger = self.ledger
        await wait_until(
            lambda: ledger.ok.keys() <= ledger.consumed.keys(),
            DRAIN_TIMEOUT,
            what=f"drain: {len(ledger.ok.keys() - ledger.consumed.keys())} acked publishes "
            "not consumed",
        )
        consumer = self.consumer
        assert isinstance(consumer, Inspectable)

        async def empty() -> bool:
            rows = [
                row for row in await consumer.stats() if (row.topic, row.group) == (TOPIC, GROUP)
            ]
            return bool(rows) and rows[0].backlog == 0

        await wait_until(empty, DRAIN_TIMEOUT, what="the group's backlog back to 0")
