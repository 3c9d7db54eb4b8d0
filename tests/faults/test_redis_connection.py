"""Connection loss on the Redis Streams backend, judged by what the clients observed.

Each test runs publishers and a consumer through a fault (RELIABILITY.md §2.0,
shortened) and then a heal-and-drain phase, and counts from its own ledger,
never from the broker's metrics: nothing ``publish`` reported as stored is
lost, nothing reported as a definite failure shows up, and the subscription
resumes by itself. The faults: every connection cut through the TCP fault
proxy with the server unreachable for a while (``on_disconnect`` ``fail`` and
``wait``), and a private redis-server killed with SIGKILL and started again on
its append-only file.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import pytest
import redis.asyncio

from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.network import TOPIC, Ledger, Workload, free_port, report
from tests.helpers.services import require_service
from wirework.brokers import redis_replies
from wirework.brokers.base import Subscription
from wirework.brokers.redis import RedisBroker, RedisSettings, purge_namespace
from wirework.brokers.redis_model import key_prefix
from wirework.envelope import WireMessage
from wirework.errors import BrokerError, ConfigurationError
from wirework.testing.conformance import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.ext]

SHARED = ("127.0.0.1", 6379)
SHARED_URL = "redis://127.0.0.1:6379/0"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
OUTAGE = 1.5


def broker(url: str, namespace: str, mode: Literal["fail", "wait"]) -> RedisBroker:
    return RedisBroker(
        url,
        settings=RedisSettings(
            namespace=namespace,
            on_disconnect=mode,
            publish_timeout=8.0,
            connect_timeout=0.5,
            command_timeout=2.0,
            reconnect_initial_backoff=0.02,
            reconnect_max_backoff=0.25,
            poll_interval=0.5,
        ),
    )


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A namespace of the shared server's, purged afterwards."""
    require_service("Redis", *SHARED)
    name = f"wwfault-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        await purge_namespace(SHARED_URL, name)


@pytest.mark.parametrize("mode", ["fail", "wait"])
async def test_cut_connections_lose_nothing_and_resume(
    namespace: str, mode: Literal["fail", "wait"]
) -> None:
    """With every connection reset and Redis unreachable for 1.5 s, 'fail' publishes fail at
    once and store nothing, 'wait' publishes wait it out, and the consumer resumes by itself."""
    ledger = Ledger()
    async with FaultProxy(*SHARED) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        publisher, consumer = broker(url, namespace, mode), broker(url, namespace, mode)
        try:
            async with Workload(publisher, consumer, ledger).running() as work:
                await wait_until(lambda: len(ledger.consumed) >= 100, 20, what="warm-up")
                proxy.upstream = ("127.0.0.1", free_port())  # nothing listens: refused
                proxy.cut()
                cut_at = time.monotonic()
                work.add_publisher("during-outage")  # the two others are mid-send, re-sending
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
    # The outage is shorter than publish_timeout: every publish on the wire at the cut was
    # re-sent under its dedup id and resolved.
    assert len(ledger.info) == 0, ledger.info
    if mode == "fail":
        assert counts["failed"] > 0, "no publish failed during the outage"
        slowest_fail = max(ledger.fail.values())
        assert slowest_fail < 0.5, f"a failing publish took {slowest_fail:.2f}s, not 'at once'"
    else:
        assert counts["failed"] == 0, counts
        assert ledger.slowest_ok >= OUTAGE * 0.5, "no publish waited for the reconnect"


class PrivateRedis:
    """A redis-server of this test alone, on a free port, persisting to an append-only file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait is async
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
            ],
        )  # fmt: skip
        await wait_until(self._answers, 10, what=f"redis-server on port {self.port} answering")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    async def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)
            self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_server_killed_and_restarted_loses_nothing(private_redis: PrivateRedis) -> None:
    """SIGKILL of a private redis-server with appendfsync always, then a restart on its AOF:
    every acknowledged publish is consumed, definite failures never appear, and publisher
    and subscription carry on by themselves."""
    ledger = Ledger()
    publisher = broker(private_redis.url, "restart", "fail")
    consumer = broker(private_redis.url, "restart", "fail")
    try:
        async with Workload(publisher, consumer, ledger).running() as work:
            await wait_until(lambda: len(ledger.consumed) >= 100, 20, what="warm-up")
            await private_redis.kill()
            work.add_publisher("during-outage")  # the two others are mid-send, re-sending
            failed_before = len(ledger.fail)
            await wait_until(
                lambda: len(ledger.fail) >= failed_before + 10, 10, what="publishes failing"
            )
            await private_redis.start()
            ok_after = len(ledger.ok)
            await wait_until(lambda: len(ledger.ok) >= ok_after + 200, 20, what="publishing again")
            consumed_after = len(ledger.consumed)
            await wait_until(
                lambda: len(ledger.consumed) >= consumed_after + 50,
                20,
                what="the subscription resuming by itself",
            )
            await work.stop_publishing_and_drain()
    finally:
        await publisher.aclose()
        await consumer.aclose()
    counts = report("restart", ledger)
    assert len(ledger.info) == 0, ledger.info
    assert counts["lost"] == 0, counts
    assert counts["failed_but_present"] == 0, counts
    assert counts["unexpected"] == 0, counts
    assert counts["failed"] > 0, counts


async def test_wait_aof_needs_redis_7_2(namespace: str) -> None:
    """wait_aof needs WAITAOF (Redis 7.2+): on an older server publish says so and stores
    nothing, instead of storing and then failing; on a newer one it publishes."""
    strict = RedisBroker(SHARED_URL, settings=RedisSettings(namespace=namespace, wait_aof=True))
    try:
        info = await strict._link.command("INFO", "server", what="reading the version")
        version = info.decode().split("redis_version:", 1)[1].split("\r\n", 1)[0]
        if tuple(int(part) for part in version.split(".")[:2]) >= (7, 2):
            # The server has WAITAOF: no refusal for the version. With appendonly off it
            # cannot confirm an fsync, which the broker must say (BrokerError), not hide.
            problem = ""
            try:
                await strict.publish(TOPIC, WireMessage(headers={"ce-id": "x"}, body=b"{}"))
            except BrokerError as exc:
                problem = str(exc)
            assert problem == "" or "AOF" in problem, problem
            return
        with pytest.raises(ConfigurationError, match=r"7\.2"):
            await strict.publish(TOPIC, WireMessage(headers={"ce-id": "x"}, body=b"{}"))
        assert not [row for row in await strict.stats() if row.topic == TOPIC]
    finally:
        await strict.aclose()


def _stalled(seconds: float, turns: int) -> Callable[[], Awaitable[None]]:
    """A task that blocks the event loop for ``seconds`` in each of its next ``turns`` turns,
    as a burst's own CPU work does on a loaded machine (the fault: a starved event loop)."""

    async def stall() -> None:
        for _ in range(turns):
            time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the fault injected
            await asyncio.sleep(0)

    return stall


async def _burst(broker: RedisBroker, count: int, stall: Callable[[], Awaitable[None]]) -> None:
    """``count`` publishes and the stall, all started in the same turn of the event loop."""
    publishes = (
        broker.publish(TOPIC, WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}"))
        for n in range(count)
    )
    await asyncio.gather(*publishes, stall())


async def test_a_burst_starting_in_one_loop_turn_does_not_time_out_its_first_connect(
    namespace: str,
) -> None:
    """A fresh broker's first 200 publishes and a 0.5 s stall share one turn of the loop: the
    connect must not start in that turn, where its 0.1 s connect_timeout would run out before
    the loop comes back to it (the CI failure: 'Timeout connecting to server')."""
    fresh = RedisBroker(
        SHARED_URL, settings=RedisSettings(namespace=namespace, connect_timeout=0.1)
    )
    try:
        await _burst(fresh, 200, _stalled(0.5, turns=1))
        rows = [row for row in await fresh.stats() if row.topic == TOPIC]
        assert [row.ready for row in rows] == [200]
    finally:
        await fresh.aclose()


async def test_a_connect_timed_out_by_a_stalled_loop_waits_for_an_open_connection(
    namespace: str,
) -> None:
    """With one connection open, a burst needs more while the loop stalls 0.3 s in each of its
    next 5 turns (0.1 s connect_timeout): every new connect times out, yet Redis answers on the
    open one, so the publishes queue for it instead of failing as if Redis were unreachable."""
    warm = RedisBroker(SHARED_URL, settings=RedisSettings(namespace=namespace, connect_timeout=0.1))
    try:
        await warm.publish(TOPIC, WireMessage(headers={"ce-id": "first"}, body=b"{}"))
        await _burst(warm, 100, _stalled(0.3, turns=5))
        rows = [row for row in await warm.stats() if row.topic == TOPIC]
        assert [row.ready for row in rows] == [101]
    finally:
        await warm.aclose()


# -- wake-ups and the reply inbox's upkeep (fewer round trips per request, issue 4) ----------


def _message(n: int) -> WireMessage:
    return WireMessage(headers={"ce-id": f"m{n}"}, body=b"{}")


async def test_a_fetch_that_empties_the_topic_leaves_it_waiting_for_the_next_publish(
    namespace: str,
) -> None:
    """A fetch that hands out the last message says the topic is idle itself (no empty fetch
    follows), so a publish from another process wakes the subscription at once: with a 5 s
    poll_interval, ten messages published one by one each arrive within a second."""
    settings = RedisSettings(namespace=namespace, poll_interval=5.0)
    publisher = RedisBroker(SHARED_URL, settings=settings)
    consumer = RedisBroker(SHARED_URL, settings=settings)
    subscription = Subscription(topic=TOPIC, group="g", start="earliest")
    try:
        await consumer.declare_group(subscription)
        deliveries = consumer.subscribe(subscription)
        for n in range(10):
            await publisher.publish(TOPIC, _message(n))
            async with asyncio.timeout(1.0):
                delivery = await anext(deliveries)
            assert delivery.message.headers["ce-id"] == f"m{n}"
            await delivery.ack()
        await deliveries.aclose()
    finally:
        await publisher.aclose()
        await consumer.aclose()


async def test_closing_the_broker_ends_an_idle_subscription_at_once(namespace: str) -> None:
    """An idle subscription waits for its wake-up only (no poll of the closing flag): closing
    the broker must ring it, so it ends at once and not at the end of its 30 s poll_interval."""
    broker = RedisBroker(SHARED_URL, settings=RedisSettings(namespace=namespace, poll_interval=30))
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    try:
        deliveries = broker.subscribe(Subscription(topic=TOPIC, group="g"))
        reading = asyncio.create_task(anext(deliveries, None))

        async def idle() -> bool:  # its fetch found nothing and marked the topic idle
            return bool(await client.exists(f"{key_prefix(namespace)}idle:{TOPIC}"))

        await wait_until(idle, 5, what="the subscription idle")
        started = time.monotonic()
        await broker.aclose()
        async with asyncio.timeout(2.0):
            assert await reading is None
        assert time.monotonic() - started < 2.0
    finally:
        await client.aclose()
        await broker.aclose()


async def test_a_reply_inbox_trims_what_it_read_and_renews_its_expiry(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's expiry renewal and trim ride along with a read only now and then: after
    many replies the stream holds few entries and still expires within TTL; and a stream
    that vanished (an outage longer than TTL, a server that lost its data) is created again
    at the next renewal, and replies sent after that arrive."""
    monkeypatch.setattr(redis_replies, "RENEW", 0.2)
    monkeypatch.setattr(redis_replies, "BLOCK", 0.2)
    broker = RedisBroker(SHARED_URL, settings=RedisSettings(namespace=namespace))
    client = redis.asyncio.Redis.from_url(SHARED_URL)
    try:
        replies = broker.direct_replies()
        inbox = await replies.open_reply_inbox("caller")
        got: list[str] = []

        async def read() -> None:
            async for message in inbox:
                got.append(message.headers["ce-id"])

        reader = asyncio.create_task(read())
        count = redis_replies.TRIM_AFTER * 2 + 10
        for n in range(count):
            await replies.send_reply(inbox.address, _message(n))
        await wait_until(lambda: len(got) == count, 5, what="every reply read")
        assert got == [f"m{n}" for n in range(count)]

        async def trimmed() -> bool:  # a renewal comes within 0.4 s: what was read goes
            return int(await client.xlen(inbox.key)) <= 1

        await wait_until(trimmed, 5, what="the inbox trimmed")
        assert 0 < await client.pttl(inbox.key) <= redis_replies.TTL * 1000

        await client.unlink(inbox.key)  # the server lost it

        async def recreated() -> bool:
            return bool(await client.exists(inbox.key))

        await wait_until(recreated, 5, what="the inbox created again")
        await replies.send_reply(inbox.address, _message(-1))
        await wait_until(lambda: got[-1:] == ["m-1"], 5, what="the reply after the loss")
        await inbox.aclose()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        await client.aclose()
        await broker.aclose()
