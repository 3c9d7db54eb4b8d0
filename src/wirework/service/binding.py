"""Where a decorated handler listens, and the shape of publish middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from wirework.consumer import Consumer, ConsumerStats, RetryPolicy
from wirework.envelope import Envelope
from wirework.service.handlers import HandlerSpec

Publish = Callable[[str, Envelope, "str | None", float], Awaitable[None]]
PublishMiddleware = Callable[[Publish], Publish]
"""Wraps the publish path: ``(topic, envelope, key, delay)``; capture, trace, outbox."""

Kind = Literal["consume", "subscribe", "respond"]


@dataclass
class Binding:
    """One decorated handler and where it listens."""

    kind: Kind
    topic: str
    group: str
    spec: HandlerSpec
    concurrency: int
    prefetch: int
    lease_timeout: float
    retry: RetryPolicy
    start: Literal["earliest", "latest"]
    idempotent: bool = False
    """Run under the inbox: the handler's store writes and its claim commit together."""
    consumer: Consumer | None = field(default=None, repr=False)
    last_stats: ConsumerStats = field(default_factory=ConsumerStats, repr=False)
    """The counters of the last run, kept after the service stops (final totals)."""

    @property
    def name(self) -> str:
        return f"{self.kind} {self.topic}" + (
            f" [{self.group}]" if self.group != self.topic else ""
        )

    @property
    def stats(self) -> ConsumerStats:
        """This run's counters while running; the last run's once stopped."""
        return self.consumer.stats if self.consumer is not None else self.last_stats
