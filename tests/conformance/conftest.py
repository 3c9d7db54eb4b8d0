"""The backends the conformance suite runs on, each built lazily by its own parameter.

A backend that needs a server (redis, amqp, nats: added with their modules)
checks it with ``require_service`` first: locally a server that does not
answer skips that backend's parameters with the reason, and under
``WIREWORK_REQUIRE_SERVICES=1`` (CI) it fails them, so a missing server can
never pass for a green run.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio

from tests.helpers.services import require_service
from wirework.brokers import connect
from wirework.testing.conformance import ConformanceTarget, InstanceTarget, UrlTarget

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Backend:
    """How to build one backend's target; ``service`` is the server it needs, if any."""

    build: Callable[[Path], ConformanceTarget]
    service: tuple[str, str, int] | None = None
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())


BACKENDS: dict[str, Backend] = {
    "memory": Backend(
        lambda _: InstanceTarget(
            lambda limit: connect("memory://", max_message_bytes=limit), name="memory"
        )
    ),
    "sqlite": Backend(lambda tmp_path: UrlTarget(f"sqlite:///{tmp_path}/b.db", name="sqlite")),
    "redis": Backend(
        lambda _: server_target(REDIS_URL, "redis"),
        service=("Redis", "127.0.0.1", 6379),
        marks=(pytest.mark.ext,),
    ),
    "rabbitmq": Backend(
        lambda _: server_target("amqp://guest:guest@127.0.0.1:5672/", "rabbitmq"),
        service=("RabbitMQ", "127.0.0.1", 5672),
        marks=(pytest.mark.ext,),
    ),
    "nats": Backend(
        lambda _: server_target("nats://127.0.0.1:4222", "nats"),
        service=("NATS", "127.0.0.1", 4222),
        marks=(pytest.mark.ext,),
    ),
}


def server_target(url: str, name: str) -> ConformanceTarget:
    """A target on a shared server, in a namespace of its own that is purged afterwards.

    Every server backend's settings take ``namespace`` (the prefix of every
    server-side name it creates) and its module has ``purge_namespace(url,
    namespace)``, which deletes everything under it. Tests share the server,
    never state.
    """
    namespace = f"wwtest-{uuid.uuid4().hex[:12]}"
    return PurgingTarget(url, name=name, namespace=namespace)


class PurgingTarget(UrlTarget):
    """A UrlTarget that deletes its namespace on the server when the check is over."""

    def __init__(self, url: str, *, name: str, namespace: str) -> None:
        super().__init__(url, name=name, namespace=namespace)
        self.url = url
        self.namespace = namespace
        self.backend = name

    async def aclose(self) -> None:
        await super().aclose()
        module = importlib.import_module(f"wirework.brokers.{self.backend}")
        await module.purge_namespace(self.url, self.namespace)


@asynccontextmanager
async def server_target_of(name: str) -> AsyncIterator[PurgingTarget]:
    """The server backend ``name`` in a namespace of its own, purged afterwards."""
    backend = BACKENDS[name]
    assert backend.service is not None, f"{name} needs no server"
    require_service(*backend.service)
    built = backend.build(Path("."))
    assert isinstance(built, PurgingTarget)
    try:
        yield built
    finally:
        await built.aclose()


@pytest.fixture(params=[pytest.param(name, marks=b.marks) for name, b in BACKENDS.items()])
async def target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ConformanceTarget]:
    """A fresh, empty store of one backend; every broker a check opened is closed after it."""
    backend = BACKENDS[request.param]
    if backend.service is not None:
        require_service(*backend.service)
    built = backend.build(tmp_path)
    try:
        yield built
    finally:
        await built.aclose()


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py client of the shared server, for checks that look at its keys."""
    service = BACKENDS["redis"].service
    assert service is not None
    require_service(*service)
    opened = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        yield opened
    finally:
        await opened.aclose()
