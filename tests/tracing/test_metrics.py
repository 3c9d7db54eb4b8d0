"""Prometheus metrics scraped over HTTP from a real uvicorn server, after real handling."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from tests.tracing.conftest import BrokerFactory
from wirework.consumer import RetryPolicy
from wirework.errors import Reject
from wirework.service import Service
from wirework.testing.conformance import wait_until
from wirework.tracing.metrics import MetricsApp, metrics_app, parse

Serve = Callable[[MetricsApp], Awaitable[str]]


class Ping(BaseModel):
    n: int


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``url = await serve(app)``: the app on uvicorn, on a loopback socket of its own."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: MetricsApp) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        servers.append((server, task))
        await wait_until(lambda: server.started, what="uvicorn started")
        return f"http://127.0.0.1:{port}/metrics"

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


async def scrape(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return response.headers["content-type"], await response.text()


async def test_counts_backlog_and_dead_letters_after_handling(
    broker_for: BrokerFactory, serve: Serve
) -> None:
    svc = Service("pinger", broker=broker_for())
    seen: list[int] = []

    @svc.subscribe("pings", retry=RetryPolicy(max_attempts=1))
    async def on_ping(ping: Ping) -> None:
        if ping.n == 0:
            raise Reject("zero is not a ping")
        seen.append(ping.n)

    app = metrics_app(svc, cache_seconds=0.0)
    url = await serve(app)
    async with svc:
        for n in (1, 2, 3, 0):
            await svc.publish("pings", Ping(n=n))
        await wait_until(lambda: len(seen) == 3, what="three pings handled")
        await wait_until(
            lambda: svc.bindings[0].stats.dead_lettered == 1, what="the zero dead-lettered"
        )
        content_type, text = await scrape(url)

    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert "wirework_messages_handled" in families  # the parser drops _total from the name
    values = parse(text)
    where = "group=pinger,service=pinger,topic=pings"
    assert values[f"wirework_messages_handled_total{{{where}}}"] == 3
    assert values[f"wirework_messages_dead_lettered_total{{{where}}}"] == 1
    assert values[f"wirework_handlers_in_flight{{{where}}}"] == 0
    assert values["wirework_dead_letters{group=pinger,topic=pings}"] == 1
    assert values["wirework_backlog_messages{group=pinger,state=ready,topic=pings}"] == 0
    assert values["wirework_broker_stats_up{service=pinger}"] == 1
    route = "group=pinger,outcome=success,route=Ping,service=pinger,topic=pings"
    assert values[f"wirework_handler_duration_seconds_count{{{route}}}"] == 3
    failed = route.replace("success", "error")
    assert values[f"wirework_handler_duration_seconds_count{{{failed}}}"] == 1


async def test_broker_stats_are_cached_between_scrapes(
    broker_for: BrokerFactory, serve: Serve
) -> None:
    svc = Service("backlogged", broker=broker_for())
    release = asyncio.Event()
    started: list[int] = []

    @svc.subscribe("jobs")
    async def on_job(ping: Ping) -> None:
        started.append(ping.n)
        await release.wait()

    app = metrics_app(svc, cache_seconds=3600.0)
    url = await serve(app)
    async with svc:
        await svc.publish("jobs", Ping(n=1))
        await wait_until(lambda: started == [1], what="the first job running")
        first = parse((await scrape(url))[1])
        for n in (2, 3):
            await svc.publish("jobs", Ping(n=n))
        second = parse((await scrape(url))[1])
        release.set()
        await wait_until(lambda: len(started) == 3, what="every job started")

    in_flight = "group=backlogged,service=backlogged,topic=jobs"
    assert first[f"wirework_handlers_in_flight{{{in_flight}}}"] == 1
    ready = "wirework_backlog_messages{group=backlogged,state=ready,topic=jobs}"
    # Within the cache period the broker is not asked again: same backlog as before.
    assert second[ready] == first[ready]


async def test_a_stopped_service_keeps_its_final_counts(
    serve: Serve,
) -> None:
    svc = Service("finished", broker="memory://")
    done: list[int] = []

    @svc.subscribe("work")
    async def on_work(ping: Ping) -> None:
        done.append(ping.n)

    app = metrics_app(svc, latency=False)
    url = await serve(app)
    async with svc:
        await svc.publish("work", Ping(n=1))
        await wait_until(lambda: done == [1], what="the work done")
    values = parse((await scrape(url))[1])
    assert (
        values["wirework_messages_handled_total{group=finished,service=finished,topic=work}"] == 1
    )
    assert not any(name.startswith("wirework_handler_duration") for name in values)
    assert not any(name.startswith("wirework_backlog") for name in values)
