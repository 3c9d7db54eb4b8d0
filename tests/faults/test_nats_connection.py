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
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.network import (
    DRAIN_TIMEOUT,
    LEASE,
    TOPIC,
    Entry,
    Ledger,
    free_port,
    publish_forever,
    report,
)
from tests.helpers.services import missing, require_service
from wirework.brokers.base import Subscription
from wirework.brokers.nats import NatsBroker, NatsSettings, purge_namespace
from wirework.consumer import Consumer, RetryPolicy, Route
from wirework.envelope import Envelope
from wirework.testing.conformance import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.ext]

SHARED = ("127.0.0.1", 4222)
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


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
async def workload(url: str, ledger: Ledger, options: NatsSettings) -> AsyncIterator[None]:
    """A publisher and a consumer (each its own connection) on ``url``; on leaving, publishing
    stops and every acked publish is handled."""
    publisher = NatsBroker(url, settings=options)
    consuming = NatsBroker(url, settings=options)

    async def handle(entry: Entry, envelope: Envelope) -> None:
        ledger.consumed[entry.id] += 1

    consumer = Consumer(
        consuming,
        Subscription(topic=TOPIC, group="ledger", lease_timeout=LEASE, prefetch=8),
        routes=[Route(None, Entry, handle)],
        retry=RetryPolicy(max_attempts=100, base_delay=0.05),
        concurrency=4,
    )
    try:
        await consuming.declare_group(consumer.subscription)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consumer.run())
            publishing = tasks.create_task(publish_forever(publisher, ledger, "p", interval=0.005))
            yield
            publishing.cancel()
            await asyncio.wait([publishing])
            await wait_until(
                lambda: ledger.ok.keys() <= ledger.consumed.keys(),
                DRAIN_TIMEOUT,
                what=f"every acked publish handled ({ledger.check()})",
            )
            await consumer.stop(grace=2.0)
    finally:
        await publisher.aclose()
        await consuming.aclose()


def check(ledger: Ledger, fault: str) -> None:
    counts = report(fault, ledger)
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
            await wait_until(lambda: len(ledger.consumed) >= 50, 20, what="consuming")
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
        assert not ledger.fail, f"wait mode failed publishes: {ledger.check()}"
    else:
        assert ledger.fail, "no publish failed during the cut"
    check(ledger, f"cut ({on_disconnect})")


# -- a private server, killed and started again ---------------------------------------------


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
        missing(f"no nats-server binary at {NATS_SERVER}; see shared/services.md")
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
        await wait_until(lambda: len(ledger.consumed) >= 50, 20, what="consuming")
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
            lambda: bool(resumed & ledger.consumed.keys()), 20, what="consuming after the restart"
        )
    check(ledger, "server SIGKILL + restart")
