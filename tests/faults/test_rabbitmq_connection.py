"""Connection loss on the RabbitMQ backend, judged by what the clients observed.

Each test runs publishers and a consumer through a fault, then a heal-and-drain
phase (RELIABILITY.md §2.0, shortened), and counts from its own ledger, never
from the broker's numbers: nothing ``publish`` reported as stored is lost,
nothing reported as a definite failure shows up, and the subscription resumes
by itself. The faults: every connection reset through the TCP fault proxy with
RabbitMQ unreachable for a while (``on_disconnect`` ``fail`` and ``wait``), and
a private RabbitMQ node of the test's own (its own node name, ports and data
directory; the shared node is never touched) killed with SIGKILL and started
again on its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.network import Ledger, Workload, free_port, report
from tests.helpers.services import missing, require_service
from wirework.brokers.rabbitmq import RabbitBroker, RabbitSettings, purge_namespace
from wirework.testing.conformance import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.ext]

SHARED = ("127.0.0.1", 5672)
SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQ_INSTALLED = RABBITMQ_SERVER.exists()
OUTAGE = 1.5


def broker(url: str, namespace: str, mode: Literal["fail", "wait"]) -> RabbitBroker:
    return RabbitBroker(
        url,
        settings=RabbitSettings(
            namespace=namespace,
            on_disconnect=mode,
            publish_timeout=8.0,
            connect_timeout=1.0,
            reconnect_initial_backoff=0.02,
            reconnect_max_backoff=0.25,
            heartbeat=2,
        ),
    )


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A namespace of the shared node's, purged afterwards."""
    require_service("RabbitMQ", *SHARED)
    name = f"wwfault-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        await purge_namespace(SHARED_URL, name)


@pytest.mark.parametrize("mode", ["fail", "wait"])
async def test_cut_connections_lose_nothing_and_resume(
    namespace: str, mode: Literal["fail", "wait"]
) -> None:
    """With every connection reset and RabbitMQ unreachable for 1.5 s, 'fail' publishes fail at
    once and store nothing, 'wait' publishes wait it out, and the consumer resumes by itself."""
    ledger = Ledger()
    async with FaultProxy(*SHARED) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        publisher, consumer = broker(url, namespace, mode), broker(url, namespace, mode)
        try:
            async with Workload(publisher, consumer, ledger).running() as work:
                await wait_until(lambda: len(ledger.consumed) >= 100, 20, what="warm-up")
                proxy.upstream = ("127.0.0.1", free_port())  # nothing listens: refused
                proxy.cut()
                cut_at = time.monotonic()
                work.add_publisher("during-outage")
                ok_before_heal = len(ledger.ok)
                await asyncio.sleep(OUTAGE)  # the outage itself is the fault being injected
                proxy.upstream = SHARED
                healed_at = time.monotonic()
                await wait_until(
                    lambda: len(ledger.ok) >= ok_before_heal + 200, 20, what="publishing again"
                )
                consumed_after_heal = len(ledger.consumed)
                await wait_until(
                    lambda: len(ledger.consumed) >= consumed_after_heal + 50,
                    20,
                    what="the subscription resuming by itself",
                )
                await work.stop_publishing_and_drain()
        finally:
            await publisher.aclose()
            await consumer.aclose()
    counts = report(f"cut ({mode})", ledger, outage=healed_at - cut_at)
    assert counts["lost"] == 0, counts
    assert counts["failed_but_present"] == 0, counts
    assert counts["unexpected"] == 0, counts
    if mode == "fail":
        # A publish on the wire at the cut has an unknown outcome (reported, not resent).
        assert counts["failed"] > 0, "no publish failed during the outage"
        slowest_fail = max(ledger.fail.values())
        assert slowest_fail < 0.5, f"a failing publish took {slowest_fail:.2f}s, not 'at once'"
    else:
        # The outage is shorter than publish_timeout: what was on the wire was sent again.
        assert counts["failed"] == 0, counts
        assert len(ledger.info) == 0, ledger.info
        assert ledger.slowest_ok >= OUTAGE * 0.5, "no publish waited for the reconnect"


class PrivateRabbit:
    """A RabbitMQ node of this test alone: own node name, AMQP and distribution ports,
    configuration, data and log directories, and an Erlang cookie in its own HOME."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.name = f"wwfault{self.port}@localhost"
        self.wrapper: subprocess.Popen[bytes] | None = None
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (directory / "env.conf").write_text("")
        (directory / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_CONF_ENV_FILE": str(d / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    async def start(self) -> None:
        (self.directory / "node.pid").unlink(missing_ok=True)
        self.wrapper = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait is async
            [str(RABBITMQ_SERVER)],
            cwd=self.directory,
            env=self._environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_until(self._answers, 60, what=f"private RabbitMQ on port {self.port}")

    def _answers(self) -> bool:
        """The AMQP listener is up (it opens once the node has booted)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as probe:
                probe.sendall(b"AMQP\x00\x00\x09\x01")
                return probe.recv(8) != b""
        except OSError:
            return False

    def _node_pid(self) -> int | None:
        try:
            return int((self.directory / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the node's Erlang VM (the process this test started) and wait for it."""
        pid = self._node_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if self.wrapper is not None:
            try:
                await asyncio.to_thread(self.wrapper.wait, 30)
            except subprocess.TimeoutExpired:
                self.wrapper.kill()
                await asyncio.to_thread(self.wrapper.wait, 10)
            self.wrapper = None
        if pid is not None:
            await wait_until(lambda: not _alive(pid), 30, what=f"node process {pid} gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def private_rabbit(tmp_path: Path) -> AsyncIterator[PrivateRabbit]:
    """A private node, started for the test and stopped after it."""
    if not RABBITMQ_INSTALLED:
        missing(f"{RABBITMQ_SERVER} is not installed; see shared/services.md")
    node = PrivateRabbit(tmp_path)
    await node.start()
    try:
        yield node
    finally:
        await node.kill(signal.SIGTERM)


@pytest.mark.slow
async def test_node_killed_and_restarted_loses_nothing(private_rabbit: PrivateRabbit) -> None:
    """SIGKILL of a private RabbitMQ node, then a restart on its data: every confirmed publish
    is consumed (quorum queues keep them), definite failures never appear, and publisher and
    subscription carry on by themselves."""
    ledger = Ledger()
    publisher = broker(private_rabbit.url, "restart", "fail")
    consumer = broker(private_rabbit.url, "restart", "fail")
    try:
        async with Workload(publisher, consumer, ledger).running() as work:
            await wait_until(lambda: len(ledger.consumed) >= 100, 20, what="warm-up")
            await private_rabbit.kill()
            work.add_publisher("during-outage")
            failed_before = len(ledger.fail)
            await wait_until(
                lambda: len(ledger.fail) >= failed_before + 10, 10, what="publishes failing"
            )
            await private_rabbit.start()
            ok_after = len(ledger.ok)
            await wait_until(lambda: len(ledger.ok) >= ok_after + 200, 30, what="publishing again")
            consumed_after = len(ledger.consumed)
            await wait_until(
                lambda: len(ledger.consumed) >= consumed_after + 50,
                30,
                what="the subscription resuming by itself",
            )
            await work.stop_publishing_and_drain()
    finally:
        await publisher.aclose()
        await consumer.aclose()
    counts = report("restart", ledger)
    assert counts["lost"] == 0, counts
    assert counts["failed_but_present"] == 0, counts
    assert counts["unexpected"] == 0, counts
    assert counts["failed"] > 0, counts
