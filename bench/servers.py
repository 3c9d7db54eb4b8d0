"""The shared servers the backend workloads use, and the namespace each run keeps to.

Every run works under one fresh namespace (``wwbench-<random>``): wirework's
objects through the backend's ``namespace`` setting, the raw clients' and
FastStream's objects under names that start with it. ``purge`` deletes
wirework's with the backend's own ``purge_namespace``; each raw or FastStream
side deletes its own objects when it closes, and ``purge`` looks for leftovers.
Nothing outside the namespace is touched.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from wirework.brokers import connect
from wirework.brokers.base import Broker


@dataclass(frozen=True)
class Server:
    name: str
    """The backend module's name: ``wirework.brokers.<name>``."""
    label: str
    url: str
    host: str
    port: int

    def unreachable(self) -> str | None:
        """Why the server cannot be used, or None when it answers."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return None
        except OSError as exc:
            return f"{self.label} does not answer on {self.host}:{self.port} ({exc})"

    def broker(self, namespace: str) -> Broker:
        return connect(self.url, namespace=namespace)


SERVERS = {
    "redis": Server("redis", "Redis", "redis://127.0.0.1:6379/0", "127.0.0.1", 6379),
    "rabbitmq": Server(
        "rabbitmq", "RabbitMQ", "amqp://guest:guest@127.0.0.1:5672/", "127.0.0.1", 5672
    ),
    "nats": Server("nats", "NATS JetStream", "nats://127.0.0.1:4222", "127.0.0.1", 4222),
}


def new_namespace() -> str:
    return f"wwbench-{uuid.uuid4().hex[:10]}"


def redis_key(namespace: str, name: str) -> str:
    """A key of the raw or FastStream side; wirework's purge of the namespace covers it too."""
    return "{" + namespace + "}:" + name


def nats_stream(namespace: str, name: str) -> str:
    """A stream of the raw or FastStream side; its subjects start with the namespace."""
    return f"{namespace}__{name}"


async def purge(server: Server, namespace: str) -> None:
    """Delete everything under ``namespace`` that wirework created, and leftovers of the rest."""
    module = importlib.import_module(f"wirework.brokers.{server.name}")
    await module.purge_namespace(server.url, namespace)
    if server.name == "rabbitmq":
        await _purge_rabbit_leftovers(server.url, namespace)


async def _purge_rabbit_leftovers(url: str, namespace: str) -> None:
    """Raw and FastStream queues are deleted by their sides; this catches an aborted run's.

    Their names are known (``<namespace>.<side>.<run>``), so each is deleted by name.
    """
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in leftover_names(namespace):
            await channel.queue_delete(name)
            await channel.exchange_delete(name)
    finally:
        await connection.close()


def leftover_names(namespace: str) -> list[str]:
    """Every queue and exchange name a raw or FastStream side may create in ``namespace``."""
    runs = [f"{side}.{shape}" for side in ("raw", "fs") for shape in ("serial", "window")]
    return [f"{namespace}.{run}" for run in [*runs, "raw.rr"]]


async def server_versions() -> dict[str, str]:
    """What each reachable server says it is, for the output (best effort)."""
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        import redis.asyncio

        client: Any = redis.asyncio.Redis.from_url(SERVERS["redis"].url)
        try:
            info = await client.info("server")
            persistence = await client.config_get("appendonly")
            found["redis"] = (
                f"Redis {info['redis_version']} (appendonly {persistence.get('appendonly', '?')})"
            )
        finally:
            await client.aclose()
    with contextlib.suppress(Exception):
        import aio_pika

        connection = await aio_pika.connect(SERVERS["rabbitmq"].url)
        try:
            properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
            version = properties.get("version", b"?")
            if isinstance(version, bytes):
                version = version.decode()
            found["rabbitmq"] = f"RabbitMQ {version}"
        finally:
            await connection.close()
    with contextlib.suppress(Exception):
        import nats

        client = await nats.connect(
            SERVERS["nats"].url, connect_timeout=2, max_reconnect_attempts=0
        )
        try:
            found["nats"] = f"NATS {client._server_info.get('version', '?')}"
        finally:
            await client.close()
    return found
