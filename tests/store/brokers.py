"""The brokers the store fault tests run over, each built lazily by its own parameter.

A test takes ``broker_url`` (``tests/store/conftest.py``) through
``@pytest.mark.parametrize("broker_url", on(...), indirect=True)``, or picks
store and broker pairs with ``matrix`` / ``case``. SQLite gets a file of the
test's own; a server backend (Redis, RabbitMQ, NATS) a namespace of its own
on the shared server (``?namespace=wwtest-...`` in the URL, so worker
processes get it too), purged afterwards. A server that does not answer
skips its parameters locally and fails them under
``WIREWORK_REQUIRE_SERVICES=1``; those parameters carry the ``ext`` mark.

``memory://`` makes a new, empty broker on every ``connect``: it cannot span
processes, and in one process every consumer must share one instance, which
``opened_brokers`` arranges.

NATS drops a publish whose ``Nats-Msg-Id`` (the CloudEvent's source and id) it
saw within its duplicate window: a test that injects a duplicate by
publishing an envelope twice publishes through ``duplicating(url)``, which
turns that off for its own publishes, so the copy reaches the inbox.
"""

from __future__ import annotations

import contextlib
import importlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.helpers.services import require_service
from wirework.brokers import Broker, Inspectable, connect


@dataclass(frozen=True)
class BrokerKind:
    """One backend: its URL (without the namespace) and the server it needs, if any."""

    url: str
    service: tuple[str, str, int] | None = None

    @property
    def marks(self) -> tuple[pytest.MarkDecorator, ...]:
        return (pytest.mark.ext,) if self.service else ()


KINDS: dict[str, BrokerKind] = {
    "memory": BrokerKind("memory://"),
    "sqlite": BrokerKind("sqlite://"),
    "redis": BrokerKind("redis://127.0.0.1:6379/0", ("Redis", "127.0.0.1", 6379)),
    "rabbitmq": BrokerKind("amqp://guest:guest@127.0.0.1:5672/", ("RabbitMQ", "127.0.0.1", 5672)),
    "nats": BrokerKind("nats://127.0.0.1:4222", ("NATS", "127.0.0.1", 4222)),
}

SERVERS = ("redis", "rabbitmq", "nats")
STORES = ("sqlite", "postgresql")


def on(*names: str) -> list[Any]:
    """``broker_url`` parameters for these brokers, marked and named by backend."""
    return [pytest.param(name, marks=KINDS[name].marks, id=name) for name in names]


def case(store: str, broker: str, *values: object, id: str = "") -> Any:
    """One row of a ``("store_url", "broker_url", ...)`` parametrisation (both indirect),
    marked ``ext`` if it needs a server."""
    marks = (pytest.mark.ext,) if store == "postgresql" or KINDS[broker].service else ()
    return pytest.param(
        store, broker, *values, marks=marks, id="-".join(filter(None, (store, broker, id)))
    )


def matrix(
    *values: object, id: str = "", both: Sequence[str], postgresql: Sequence[str] = ()
) -> list[Any]:
    """``case`` rows: the ``both`` brokers on each store, the ``postgresql`` ones on PostgreSQL
    only (the production pairing, and half the wall time of both)."""
    rows = [case(store, broker, *values, id=id) for broker in both for store in STORES]
    rows += [case("postgresql", broker, *values, id=id) for broker in postgresql]
    return rows


#: ``parametrize`` keywords for the rows of ``case`` and ``matrix``.
BOTH = ("store_url", "broker_url")


@contextlib.asynccontextmanager
async def empty_broker_url(name: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty broker of backend ``name``, its server namespace purged after."""
    kind = KINDS[name]
    if name == "memory":
        yield kind.url
        return
    if name == "sqlite":
        yield f"sqlite:///{tmp_path}/broker.db"
        return
    assert kind.service is not None
    require_service(*kind.service)
    namespace = f"wwtest-{uuid.uuid4().hex[:12]}"
    try:
        yield f"{kind.url}?namespace={namespace}"
    finally:
        module = importlib.import_module(f"wirework.brokers.{name}")
        await module.purge_namespace(kind.url, namespace)


def backend(url: str) -> str:
    """The backend name of a URL made by ``empty_broker_url``."""
    scheme = urlsplit(url).scheme
    return {"amqp": "rabbitmq"}.get(scheme, scheme)


def duplicating(url: str) -> str:
    """``url`` for a publisher whose repeated envelopes must all be stored (see above)."""
    return f"{url}&deduplicate=false" if backend(url) == "nats" else url


@contextlib.asynccontextmanager
async def opened_brokers(*urls: str, like: Broker | None = None) -> AsyncIterator[Sequence[Broker]]:
    """A broker per URL (connections of their own), closed afterwards.

    On ``memory://`` they are one instance, the only way two consumers share it:
    ``like`` if given (it stays open), else a new one.
    """
    if backend(urls[0]) == "memory":
        shared = like or connect(urls[0])
        brokers = [shared] * len(urls)
    else:
        brokers = [connect(url) for url in urls]
    try:
        yield brokers
    finally:
        for broker in dict.fromkeys(brokers):
            if broker is not like:
                await broker.aclose()


async def backlog(broker: Broker, topic: str, group: str | None = None) -> int:
    """Messages of ``topic`` not yet settled by ``group`` (by every group if None)."""
    assert isinstance(broker, Inspectable)
    rows = await broker.stats()
    return sum(
        row.backlog for row in rows if row.topic == topic and (group is None or row.group == group)
    )
