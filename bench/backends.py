"""Workload 9: publish -> consume -> ack on each server, beside its raw client and FastStream.

Per server and producer shape, three sides do the same work in turn, each on
a fresh topic or queue of the run's namespace, publisher and consumer in this
process: wirework (``broker.publish`` and a ``Consumer``), the raw client
(``bench.raw_clients``) and FastStream (``bench.faststream_peer``). Which side
goes first moves on by one with every run (across cases and servers too), so
no side always runs first; with ``--repeat`` each figure is the median run's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence

from bench import faststream_peer, raw_clients
from bench.flow import PRODUCERS, Counter, Producer, Side, Throughput, median, throughput
from bench.payload import CONCURRENCY, GROUP, PREFETCH, Order, make_messages
from bench.plan import Sizes, progress
from bench.report import Figure
from bench.servers import SERVERS, Server, new_namespace, purge
from wirework.brokers import connect
from wirework.brokers.base import GroupAdmin, Subscription
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope, WireMessage

#: wirework's throughput must reach this share of the raw client's, and of FastStream's.
MIN_RAW_RATIO = 0.8
MIN_FASTSTREAM_RATIO = 1.0

SideFactory = Callable[[str, str, str], Side]
"""(server URL, namespace, run name) -> a side."""


class WireworkSide:
    """``broker.publish`` and one ``Consumer`` (concurrency 8, prefetch 32) on a fresh topic."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.broker = connect(url, namespace=namespace)
        self.subscription = Subscription(topic=f"bench.{name}", group=GROUP, prefetch=PREFETCH)
        self.consumer: Consumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.expected = 0

    async def start(self, counter: Counter) -> None:
        if not isinstance(self.broker, GroupAdmin):
            raise TypeError(f"{type(self.broker).__name__} cannot declare groups")
        await self.broker.declare_group(self.subscription)

        async def handle(order: Order, envelope: Envelope) -> None:
            counter.add()

        self.expected = counter.expected
        self.consumer = Consumer(
            self.broker,
            self.subscription,
            routes=[Route(None, Order, handle)],
            concurrency=CONCURRENCY,
        )
        self.task = asyncio.create_task(self.consumer.run())
        counter.watch(self.task)

    async def send(self, message: WireMessage) -> None:
        await self.broker.publish(self.subscription.topic, message)

    async def settled(self) -> None:
        assert self.consumer is not None
        while self.consumer.stats.handled < self.expected:  # counted once its ack returned
            await asyncio.sleep(0.0005)

    async def aclose(self) -> None:
        try:
            if self.consumer is not None and self.task is not None:
                await self.consumer.stop()
                await self.task
        finally:
            await self.broker.aclose()


SIDES: dict[str, tuple[SideFactory, SideFactory, SideFactory]] = {
    "redis": (WireworkSide, raw_clients.RawRedis, faststream_peer.FastStreamRedis),
    "rabbitmq": (WireworkSide, raw_clients.RawRabbit, faststream_peer.FastStreamRabbit),
    "nats": (WireworkSide, raw_clients.RawNats, faststream_peer.FastStreamNats),
}

#: What each side does per message on each server, printed beside its serial figure.
SIDE_NOTES = {
    "redis": [
        "wirework: one Lua function (FCALL) per publish (XADD, dedup key), per fetch "
        "(XREADGROUP/XCLAIM, lease zset) and per ack (XPENDING check, XACK, XDEL once no "
        "group needs the entry); a pub/sub wake-up only when a subscription said it is idle",
        "raw: redis-py + hiredis, XADD (fields h, b); XREADGROUP with a group, COUNT = free "
        "prefetch, BLOCK 100 ms; XACK per message; a blocking pool of 64 connections",
        "FastStream: RedisBroker, StreamSub(group, consumer, max_records=32), max_workers=8, "
        "XACK after the handler; publish(stream=) is one XADD; max_connections=128",
    ],
    "rabbitmq": [
        "wirework (aiormq): persistent, mandatory, confirmed publish to the topic's direct "
        "exchange, routed to the group's durable quorum queue; basic.qos; basic.ack",
        "raw: aio-pika, the same topology by hand (durable direct exchange, durable quorum "
        "queue), persistent + mandatory publish with confirms; basic.qos 32, manual ack",
        "FastStream: RabbitBroker (confirms on its channel), RabbitExchange + quorum "
        "RabbitQueue, Channel(prefetch_count=32), publish(persist=True, mandatory=True); it "
        "has no max_workers for RabbitMQ, so up to 32 handlers run at once",
    ],
    "nats": [
        "wirework: publish awaits the PubAck (Nats-Msg-Id dedup header built once, size "
        "check); one long-poll pull open (batch = free prefetch, 5 s; one message when "
        "idle); plain +ACKs of one event-loop turn written together on the next turn, "
        "never with a publish",
        "raw: nats-py, js.publish awaits the PubAck; stream file/interest; durable pull "
        "consumer, fetch(batch=free prefetch, timeout=0.1 s: it waits until the batch is "
        "full or the time is up); msg.ack() (fire and forget)",
        "FastStream: NatsBroker, JStream(file, interest), durable pull subscriber "
        "PullSub(batch_size=32, timeout=0.1), max_workers=8, msg.ack(); publish(stream=) "
        "awaits the PubAck",
    ],
}


def describe() -> list[str]:
    return [
        f"server backends: per server and producer shape, wirework, the raw client and "
        f"FastStream in turn (the first side rotating run by run), each on a fresh "
        f"topic/queue of the run's namespace; consumer "
        f"concurrency {CONCURRENCY}, prefetch {PREFETCH}, a handler that parses the body "
        f"into the same pydantic model (wirework's Consumer also decodes the CloudEvent); "
        f"publisher and consumer in this process; FastStream with logger=None (no "
        f"per-message log lines, as wirework writes none)",
        "throughput = messages / (first publish .. last ack); same messages (CloudEvents, "
        "binary mode) for all three; same durability: Redis as the server keeps it "
        "(persistence off on this machine), RabbitMQ durable quorum queues with persistent "
        "messages and publisher confirms, NATS file-stored streams with interest retention",
    ]


SIDE_NAMES = ("wirework", "raw", "FastStream")


def _order(first: int) -> list[int]:
    """The sides' order in one run, starting at side ``first`` (mod 3): over consecutive
    runs each side goes first, second and third in turn, so whatever the first run of a
    case pays (a cold server, a JIT-less warm-up of the client) is not always one side's."""
    count = len(SIDE_NAMES)
    return [(first + step) % count for step in range(count)]


def _measure(
    factory: SideFactory,
    server: Server,
    namespace: str,
    name: str,
    messages: Sequence[WireMessage],
    producer: Producer,
) -> Throughput:
    side = factory(server.url, namespace, name)
    return asyncio.run(throughput(side, messages, producer))


def throughputs(sizes: Sizes) -> list[Figure]:
    """Workload 9: per server, a serial and a windowed producer, three sides each."""
    faststream_peer.quiet()
    messages = make_messages(sizes.backend_messages)
    found: list[Figure] = []
    letters = iter("abcdef")
    turns = itertools.count()  # which side goes first: the next one each run, all servers
    for name, server in SERVERS.items():
        keys = [f"9{next(letters)}" for _ in PRODUCERS]
        if name not in sizes.servers:
            continue
        reason = server.unreachable()
        if reason is not None:
            print(f"  skipped {server.label}: {reason}", flush=True)
            continue
        namespace = new_namespace()
        print(f"  {server.label}: namespace {namespace}", flush=True)
        try:
            for key, (shape, producer) in zip(keys, PRODUCERS.items(), strict=True):
                run = "serial" if shape == "serial" else "window"
                # A fresh topic per repeat: the same messages again on one NATS stream
                # would be dropped by its duplicate window (Nats-Msg-Id) as repeats.
                runs = []
                for repeat in range(sizes.repeat):
                    first = next(turns)
                    results: dict[int, Throughput] = {}
                    for side in _order(first):
                        factory = SIDES[name][side]
                        results[side] = _measure(
                            factory, server, namespace, f"{run}{repeat}", messages, producer
                        )
                    runs.append([results[side] for side in range(len(SIDE_NAMES))])
                found.append(_figure(key, server, shape, runs))
                progress(found[-1])
        finally:
            asyncio.run(purge(server, namespace))
    if found:
        found[0].notes = [*describe(), *found[0].notes]
    return found


def _figure(key: str, server: Server, shape: str, runs: list[list[Throughput]]) -> Figure:
    wirework, raw, faststream = (median([run[i].rate for run in runs]) for i in range(3))
    middle = runs[len(runs) // 2]
    notes = [
        f"publishing alone took {middle[0].publish_seconds:.2f} s wirework, "
        f"{middle[1].publish_seconds:.2f} s raw, {middle[2].publish_seconds:.2f} s FastStream",
    ]
    if len(runs) > 1:
        spread = ", ".join(f"{r[0].rate:,.0f}/{r[1].rate:,.0f}/{r[2].rate:,.0f}" for r in runs)
        notes.append(
            f"median of {len(runs)} runs, the first side rotating from run to run "
            f"(wirework/raw/FastStream msg/s: {spread})"
        )
    if shape == "serial":
        notes = [*SIDE_NOTES[server.name], *notes]
    count = middle[0].messages
    return Figure(
        key,
        f"{server.label}, 1 producer, {shape}, {count:,} msgs",
        wirework,
        "msg/s",
        floor=raw,
        floor_name="raw",
        min_ratio=MIN_RAW_RATIO,
        peer=faststream,
        peer_name="FastStream",
        min_peer_ratio=MIN_FASTSTREAM_RATIO,
        notes=notes,
    )
