"""How the conformance checks open the backend under test.

A check receives a fresh ``ConformanceTarget`` (an empty store) and calls
``open()`` for every broker it needs. What a second ``open()`` means differs
by backend, and the target says which it is, so a check can state what it
proved:

* ``shared_between_instances``: every ``open()`` is a new broker over the same
  store, as two processes would have (two ``SqliteBroker`` on one file, two
  clients of one server). Competing-consumer checks then really compete
  across instances.
* otherwise every ``open()`` returns the one in-process instance (memory).

``persistent`` says that a broker opened after another was closed still sees
what the closed one stored, which lets the durability check close and reopen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from wirework.brokers import connect
from wirework.brokers.base import DEFAULT_MAX_MESSAGE_BYTES, Broker


class ConformanceTarget(ABC):
    """A backend under test; subclass it (or use the two below) for a new backend.

    Attributes:
        name: shown in failure messages.
        shared_between_instances: each ``open()`` is a new broker on the same store.
        persistent: a broker opened after ``aclose()`` of another sees its messages.
    """

    name: str = "backend"
    shared_between_instances: bool = False
    persistent: bool = False

    def __init__(self) -> None:
        self._opened: list[Broker] = []

    async def open(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Broker:
        """A broker over this target's store, closed by ``aclose()`` at the latest."""
        broker = await self._open(max_message_bytes)
        self._opened.append(broker)
        return broker

    @abstractmethod
    async def _open(self, max_message_bytes: int) -> Broker:
        """Make (or hand back) a broker with this message size limit."""

    async def aclose(self) -> None:
        """Close every broker this target opened (``Broker.aclose`` is idempotent)."""
        for broker in reversed(self._opened):
            await broker.aclose()
        self._opened.clear()


class UrlTarget(ConformanceTarget):
    """Connects to ``url`` anew on every ``open()``: a store that outlives one broker.

    Args:
        url: what ``wirework.brokers.connect`` opens, e.g. ``sqlite:////tmp/x/b.db``.
        name: shown in failure messages; the URL scheme by default.
        shared_between_instances: see ``ConformanceTarget``; true for a file or a server.
        persistent: see ``ConformanceTarget``; true for a file or a durable server.
        options: further backend settings passed to ``connect``.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        shared_between_instances: bool = True,
        persistent: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.url = url
        self.name = name or url.split(":", 1)[0]
        self.shared_between_instances = shared_between_instances
        self.persistent = persistent
        self._options = options

    async def _open(self, max_message_bytes: int) -> Broker:
        return connect(self.url, max_message_bytes=max_message_bytes, **self._options)


class InstanceTarget(ConformanceTarget):
    """One in-process broker, made on the first ``open()`` and handed back by every later one.

    The size limit of the first ``open()`` wins; checks that need a small limit
    ask for it first.

    Args:
        factory: makes the broker from a message size limit.
        name: shown in failure messages.
    """

    def __init__(self, factory: Callable[[int], Broker], *, name: str = "memory") -> None:
        super().__init__()
        self.name = name
        self._factory = factory
        self._broker: Broker | None = None

    async def _open(self, max_message_bytes: int) -> Broker:
        if self._broker is None:
            self._broker = self._factory(max_message_bytes)
        return self._broker
