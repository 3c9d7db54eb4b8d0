"""Connection loss on the NATS JetStream backend, judged by what the clients observed.

Two faults, each while a publisher and a consumer run (RELIABILITY.md §2.0,
shortened): every connection cut through the TCP fault proxy, and a private
nats-server killed (SIGKILL) and started again on its store. The counts come
from the test's own ledger (publish outcomes, handled ids), never from the
broker: nothing that ``publish`` reported as stored is lost, nothing reported
as a definite failure shows up, and the subscription resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from tests.conformance.conftest import require_service
from tests.helpers.fault_proxy import FaultProxy
from wirework.brokers.base import Subscription
from wirework.brokers.nats import NatsBroker, NatsSettings, purge_namespace
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope, encode_binary
from wirework.errors import BrokerUnavailableError, PublishOutcomeUnknownError

pytestmark = [pytest.mark.fault, pytest.mark.ext]

SHARED = ("127.0.0.1", 4222)
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
TOPIC = "ledger"
LEASE = 1.0
DRAIN_TIMEOUT = 30.0


class Entry(BaseModel):
    id: str


@dataclass
class Ledger:
    """What the test saw: each publish's outcome, and each id a handler completed."""

    ok: dict[str, float] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    info: set[str] = field(default_factory=set)
    handled: dict[str, int] = field(default_factory=dict)

    def attempted(self) -> set[str]:
        return set(self.ok) | self.fail | self.info

    def counts(self) -> dict[str, int]:
        consumed = set(self.handled)
        return {
            "attempted": len(self.attempted()),
            "acked": len(self.ok),
            "failed": len(self.fail),
            "unknown": len(self.info),
            "lost": len(set(self.ok) - consumed),
            "failed_but_present": len(self.fail & consumed),
            "unexpected": len(consumed - self.attempted()),
            "recovered": len(self.info & consumed),
            "redeliveries": sum(self.handled.values()) - len(consumed),
        }


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, *, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def settings(namespace: str, on_disconnect: Literal["fail", "wait"]) -> NatsSettings:
    return NatsSettings(
        namespace=namespace,
        on_disconnect=on_disconnect,
        publish_timeout=4.0,
        connect_timeout=0.5,
        api_timeout=2.0,
        reconnect_initial_backoff=0.05,
        reconnect_max_backoff=0.25,
    )


@contextlib.asynccontextmanager
async def workload(
    url: str, ledger: Ledger, options: NatsSettings, *, interval: float = 0.005
) -> AsyncIterator[Callable[[], None]]:
    """A publisher and a consumer (each its own connection) on ``url``; yields ``stop``."""
    publisher = NatsBroker(url, settings=options)
    consuming = NatsBroker(url, settings=options)
    stopped = asyncio.Event()

    async def handle(entry: Entry, envelope: Envelope) -> None:
        ledger.handled[entry.id] = ledger.handled.get(entry.id, 0) + 1

    consumer = Consumer(
        consuming,
        Subscription(topic=TOPIC, group="ledger", lease_timeout=LEASE, prefetch=8),
        routes=[Route(None, Entry, handle)],
        retry=RetryPolicy(max_attempts=100, base_delay=0.05),
        concurrency=4,
    )

    async def publish() -> None:
        for n in range(1_000_000):
            if stopped.is_set():
                return
            entry_id = f"p-{n}"
            message = encode_binary(
                Envelope.new("ledger.entry", Entry(id=entry_id), source="tests", id=entry_id)
            )
            try:
                await publisher.publish(TOPIC, message)
            except PublishOutcomeUnknownError:
                ledger.info.add(entry_id)  # sent, then the link broke: maybe stored
            except BrokerUnavailableError:
                ledger.fail.add(entry_id)  # the contract: nothing was stored
            except Exception:
                ledger.info.add(entry_id)  # unknown outcome, as Jepsen's :info
            else:
                ledger.ok[entry_id] = time.monotonic()
            await asyncio.sleep(interval)

    try:
        await consuming.declare_group(consumer.subscription)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consumer.run())
            publishing = tasks.create_task(publish())
            yield stopped.set
            stopped.set()
            await publishing
            await wait_until(
                lambda: set(ledger.ok) <= set(ledger.handled),
                DRAIN_TIMEOUT,
                what=f"every acked publish handled ({ledger.counts()})",
            )
            await consumer.stop(grace=2.0)
    finally:
        await publisher.aclose()
        await consuming.aclose()


def check(ledger: Ledger, fault: str) -> None:
    counts = ledger.counts()
    print(f"{fault}: {counts}")
    assert counts["lost"] == 0, counts
    assert counts["failed_but_present"] == 0, counts
    assert counts["unexpected"] == 0, counts


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    require_service("NATS", *SHARED)
    name = f"wwfault-{uuid.uuid4().hex[:10]}"
    yield name
    await purge_namespace(f"nats://{SHARED[0]}:{SHARED[1]}", name)


@pytest.mark.parametrize("on_disconnect", ["fail", "wait"])
async def test_cut_connections_lose_nothing_and_resume(
    namespace: str, on_disconnect: Literal["fail", "wait"]
) -> None:
    """Every connection reset and refused for a while: publishes fail fast (fail mode) or wait
    (wait mode), none reports success without being stored, and consuming resumes by itself."""
    ledger = Ledger()
    async with FaultProxy(*SHARED) as proxy:
        url = f"nats://127.0.0.1:{proxy.port}"
        async with workload(url, ledger, settings(namespace, on_disconnect)):
            await wait_until(lambda: len(ledger.handled) >= 50, 20, what="consuming")
            before = (len(ledger.ok), len(ledger.fail))
            proxy.blackhole = True  # reconnection attempts reach nothing
            proxy.cut()
            cut_at = time.monotonic()
            if on_disconnect == "fail":
                await wait_until(lambda: len(ledger.fail) >= 20, 10, what="publishes failing")
            else:
                # Let the outage outlast several publish attempts' worth of time.
                await wait_until(lambda: time.monotonic() - cut_at > 1.0, 5, what="an outage")
            assert len(ledger.ok) - before[0] <= 1, "publishes succeeded while cut off"
            proxy.blackhole = False
            healed_at = time.monotonic()
            await wait_until(
                lambda: sum(1 for t in ledger.ok.values() if t > healed_at) >= 50,
                20,
                what="publishing again after the heal",
            )
    if on_disconnect == "wait":
        assert not ledger.fail, f"wait mode failed publishes: {ledger.counts()}"
    else:
        assert ledger.fail, "no publish failed during the cut"
    check(ledger, f"cut ({on_disconnect})")


# -- a private server, killed and started again ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """A nats-server of this test alone, on a free port, storing in a temporary directory."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.args = [
            NATS_SERVER,
            *("-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = await asyncio.to_thread(
            subprocess.Popen, self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await wait_until(self._answers, 10, what=f"nats-server on port {self.port}")

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        return True

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[PrivateServer]:
    if not os.access(NATS_SERVER, os.X_OK):
        reason = f"no nats-server binary at {NATS_SERVER}; see shared/services.md"
        if os.environ.get("WIREWORK_REQUIRE_SERVICES") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    private = PrivateServer(tmp_path / "jetstream")
    await private.start()
    try:
        yield private
    finally:
        private.kill()


async def test_server_killed_and_restarted_loses_nothing(server: PrivateServer) -> None:
    """SIGKILL of the server mid-stream: publishes fail while it is down, and after it restarts
    on its store every acked publish is consumed and the subscription resumes by itself."""
    ledger = Ledger()
    url = f"nats://127.0.0.1:{server.port}"
    async with workload(url, ledger, settings("wwkill", "fail")):
        await wait_until(lambda: len(ledger.handled) >= 50, 20, what="consuming")
        server.kill()
        await wait_until(lambda: len(ledger.fail) >= 20, 10, what="publishes failing")
        await server.start()
        restarted_at = time.monotonic()
        await wait_until(
            lambda: sum(1 for t in ledger.ok.values() if t > restarted_at) >= 50,
            20,
            what="publishing again after the restart",
        )
        resumed = {i for i, t in ledger.ok.items() if t > restarted_at}
        await wait_until(
            lambda: bool(resumed & set(ledger.handled)), 20, what="consuming after the restart"
        )
    check(ledger, "server SIGKILL + restart")
