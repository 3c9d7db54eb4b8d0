"""Prometheus metrics for services: handler counts and latency, in-flight, backlog, dead letters.

::

    app = metrics_app(orders, billing)      # the runner mounts it at /metrics

Most numbers cost nothing per message: the consumers already count what
they handled, failed, retried and dead-lettered (``ConsumerStats``), and
those counters are read when Prometheus scrapes. Backlog and dead letters
per topic and group come from the broker's ``Inspectable.stats()``, also at
scrape time and cached for ``cache_seconds`` so that several scrapers (or a
fast one) cost one broker query. Only the latency histograms need work per
message: ``metrics_app`` adds a consume middleware to each service that
observes each handling (a few microseconds; ``latency=False`` leaves it out).

Series (labels ``service``, ``topic``, ``group``; ``route`` is the event type):

* ``wirework_messages_handled_total``, ``..._failed_total``, ``..._retried_total``,
  ``..._dead_lettered_total`` and ``wirework_handlers_in_flight``;
* ``wirework_handler_duration_seconds`` (with ``route`` and ``outcome``);
* ``wirework_backlog_messages`` (``state``: ready, delayed, in_flight) and
  ``wirework_dead_letters`` per topic and group, ``wirework_broker_stats_up`` per broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wirework.brokers.base import GroupStats, Inspectable
from wirework.consumer import ConsumeApp, Incoming

if TYPE_CHECKING:
    from wirework.service.service import Service

log = logging.getLogger("wirework.metrics")

DEFAULT_CACHE_SECONDS = 2.0
DEFAULT_STATS_TIMEOUT = 2.0
#: Handler latency buckets, seconds: from a fast in-memory handler to a slow call chain.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_GROUP_LABELS = ("service", "topic", "group")


@dataclass
class BrokerStats:
    """The last rows a broker's ``stats()`` gave, when, and whether that query worked."""

    rows: Sequence[GroupStats] = ()
    at: float = float("-inf")
    up: bool = False


@dataclass(eq=False)  # hashable by identity: the registry keys collectors
class ServiceCollector(Collector):
    """Reads the services' consumer counters and the cached broker rows on each scrape.

    ``refresh()`` (awaited by the ASGI app before it renders) updates the broker
    rows; ``collect()`` itself never waits on anything.
    """

    services: Sequence[Service]
    cache_seconds: float = DEFAULT_CACHE_SECONDS
    stats_timeout: float = DEFAULT_STATS_TIMEOUT
    brokers: dict[int, tuple[str, BrokerStats]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _running_brokers(self) -> dict[int, tuple[str, Any]]:
        """The brokers the running consumers read from, by identity, with a label."""
        found: dict[int, tuple[str, Any]] = {}
        for service in self.services:
            for binding in service.bindings:
                if binding.consumer is not None:
                    broker = binding.consumer.broker
                    found.setdefault(id(broker), (service.name, broker))
        return found

    async def refresh(self) -> None:
        """Query every running broker whose cached rows are older than ``cache_seconds``."""
        async with self._lock:
            now = time.monotonic()
            running = self._running_brokers()
            for key in list(self.brokers):
                if key not in running:
                    del self.brokers[key]  # a stopped service's broker is not reported
            for key, (owner, broker) in running.items():
                _, cached = self.brokers.get(key, (owner, BrokerStats()))
                if now - cached.at < self.cache_seconds:
                    continue
                self.brokers[key] = (owner, await self._query(broker, cached))

    async def _query(self, broker: Any, cached: BrokerStats) -> BrokerStats:
        if not isinstance(broker, Inspectable):
            return BrokerStats(at=time.monotonic(), up=False)
        try:
            rows = await asyncio.wait_for(broker.stats(), self.stats_timeout)
        except Exception as exc:
            # Keep the last known rows (a scrape must not fail); say the query failed.
            log.warning("broker stats for metrics failed: %s: %s", type(exc).__name__, exc)
            return BrokerStats(rows=cached.rows, at=time.monotonic(), up=False)
        return BrokerStats(rows=list(rows), at=time.monotonic(), up=True)

    def collect(self) -> Iterator[Metric]:
        counters = {
            name: CounterMetricFamily(
                f"wirework_messages_{name}", f"Messages {text}, per consumer.", labels=_GROUP_LABELS
            )
            for name, text in (
                ("handled", "handled successfully"),
                ("failed", "whose handler failed (each attempt)"),
                ("retried", "scheduled for another attempt"),
                ("dead_lettered", "moved to the dead letters"),
            )
        }
        in_flight = GaugeMetricFamily(
            "wirework_handlers_in_flight", "Handlers running now.", labels=_GROUP_LABELS
        )
        for service in self.services:
            seen: set[int] = set()
            for binding in service.bindings:
                # Several bindings may share one consumer (one topic and group):
                # its counters are reported once.
                consumer = binding.consumer
                if consumer is not None and id(consumer) in seen:
                    continue
                if consumer is not None:
                    seen.add(id(consumer))
                stats = binding.stats
                labels = [service.name, binding.topic, binding.group]
                counters["handled"].add_metric(labels, stats.handled)
                counters["failed"].add_metric(labels, stats.failed)
                counters["retried"].add_metric(labels, stats.retried)
                counters["dead_lettered"].add_metric(labels, stats.dead_lettered)
                in_flight.add_metric(labels, stats.in_flight)
        yield from counters.values()
        yield in_flight
        yield from self._broker_metrics()

    def _broker_metrics(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "wirework_backlog_messages",
            "Messages waiting per topic and group, by state, as the broker last reported.",
            labels=("topic", "group", "state"),
        )
        dead = GaugeMetricFamily(
            "wirework_dead_letters",
            "Dead letters kept per topic and group, as the broker last reported.",
            labels=("topic", "group"),
        )
        up = GaugeMetricFamily(
            "wirework_broker_stats_up",
            "1 when the last stats query of the broker worked.",
            labels=("service",),
        )
        reported: set[tuple[str, str]] = set()
        for owner, stats in self.brokers.values():
            up.add_metric([owner], 1.0 if stats.up else 0.0)
            for row in stats.rows:
                where = (row.topic, row.group or "")
                if where in reported:
                    continue  # two services sharing one broker report its rows once
                reported.add(where)
                backlog.add_metric([*where, "ready"], row.ready)
                backlog.add_metric([*where, "delayed"], row.delayed)
                backlog.add_metric([*where, "in_flight"], row.in_flight)
                dead.add_metric(list(where), row.dead_lettered)
        yield backlog
        yield dead
        yield up


class Measure:
    """A consume middleware observing each handling's duration, per route and outcome."""

    def __init__(self, service: Service, histogram: Histogram) -> None:
        self.service = service
        self.histogram = histogram

    def __call__(self, app: ConsumeApp) -> ConsumeApp:
        histogram, name = self.histogram, self.service.name
        children: dict[tuple[str, str, str, str], Any] = {}

        def child(incoming: Incoming, outcome: str) -> Any:
            delivery = incoming.delivery
            route = incoming.route.event_type or "*"
            key = (delivery.topic, delivery.group or "", route, outcome)
            found = children.get(key)
            if found is None:
                found = children[key] = histogram.labels(name, *key)
            return found

        async def measured(incoming: Incoming) -> None:
            start = time.perf_counter()
            try:
                await app(incoming)
            except BaseException:
                child(incoming, "error").observe(time.perf_counter() - start)
                raise
            child(incoming, "success").observe(time.perf_counter() - start)

        return measured


def handler_histogram(registry: CollectorRegistry | None = None) -> Histogram:
    """The ``wirework_handler_duration_seconds`` histogram, in ``registry``."""
    return Histogram(
        "wirework_handler_duration_seconds",
        "Time handlers took, per route (event type) and outcome.",
        labelnames=("service", "topic", "group", "route", "outcome"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )


@dataclass
class MetricsApp:
    """An ASGI app answering ``GET`` with the Prometheus text of ``registry``.

    Before rendering it awaits ``collector.refresh()`` (cached broker stats),
    so the synchronous collectors never block the event loop on a broker.
    """

    registry: CollectorRegistry
    collector: ServiceCollector
    histogram: Histogram

    def measure(self, service: Service) -> Measure:
        """Add latency histograms to ``service`` (call before it starts)."""
        middleware = Measure(service, self.histogram)
        service.use(middleware)
        return middleware

    async def render(self) -> bytes:
        """The exposition text, after refreshing stale broker stats."""
        await self.collector.refresh()
        return generate_latest(self.registry)

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"use GET\n", b"text/plain; charset=utf-8", [b"GET, HEAD"])
            return
        body = await self.render()
        await _respond(
            send, 200, b"" if scope["method"] == "HEAD" else body, CONTENT_TYPE_LATEST.encode()
        )


async def _respond(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    status: int,
    body: bytes,
    content_type: bytes,
    allow: Sequence[bytes] = (),
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    headers.extend((b"allow", value) for value in allow)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Nothing to start or stop: acknowledge both, so the app can be served on its own."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def metrics_app(
    *services: Service,
    cache_seconds: float = DEFAULT_CACHE_SECONDS,
    stats_timeout: float = DEFAULT_STATS_TIMEOUT,
    latency: bool = True,
) -> MetricsApp:
    """An ASGI app serving the metrics of ``services`` (a registry of its own).

    Args:
        services: the services reported; their counters are read on each scrape.
        cache_seconds: how long broker stats (backlog, dead letters) are reused.
        stats_timeout: the longest a scrape waits for a broker's stats; on timeout
            the last rows are served and ``wirework_broker_stats_up`` is 0.
        latency: add the latency histogram middleware to every service (it takes
            effect from a service's next start); False leaves it to
            ``app.measure(service)`` per service, or to none.
    """
    registry = CollectorRegistry(auto_describe=True)
    collector = ServiceCollector(services, cache_seconds=cache_seconds, stats_timeout=stats_timeout)
    registry.register(collector)
    app = MetricsApp(registry=registry, collector=collector, histogram=handler_histogram(registry))
    if latency:
        for service in services:
            app.measure(service)
    return app


def parse(text: str) -> dict[str, float]:
    """``{"name{label=value,...}": value}`` from exposition text, for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found
