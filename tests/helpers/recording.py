"""A broker wrapper that writes what a consumer was handed and how it settled to a ledger.

The ``Consumer`` hides the ack from its handler; wrapping the broker is how a
worker records ``acked`` only after ``ack()`` returned (or the future of
``start_ack()`` ended), whichever code called it. Everything else is passed straight through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from wirework.brokers.base import Broker, DeadLetterReason, Delivery, Failure, Subscription
from wirework.envelope import WireMessage
from wirework.errors import BrokerError
from wirework.testing.ledger import LedgerFile


class RecordingBroker(Broker):
    """``inner`` with ``received`` / ``acked`` / ``nacked`` / ``dead_lettered`` records."""

    def __init__(self, inner: Broker, ledger: LedgerFile) -> None:
        self.inner = inner
        self.ledger = ledger
        self.max_message_bytes = inner.max_message_bytes

    async def publish(
        self,
        topic: str,
        message: WireMessage,
        *,
        key: str | None = None,
        delay: float = 0.0,
    ) -> None:
        await self.inner.publish(topic, message, key=key, delay=delay)

    async def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        # Closing this generator closes the inner one, which hands back what it holds.
        async with contextlib.aclosing(self.inner.subscribe(subscription)) as deliveries:
            async for delivery in deliveries:
                message_id = delivery.message.message_id or "-"
                self.ledger.record("received", message_id, attempt=delivery.attempt)
                yield RecordingDelivery(delivery, message_id, self.ledger)

    async def aclose(self) -> None:
        await self.inner.aclose()


class WrappedDelivery(Delivery):
    """A delivery that is another one's stand-in: its message and state are the inner's."""

    def __init__(self, inner: Delivery) -> None:
        self._inner = inner
        self.message = inner.message
        self.topic = inner.topic
        self.group = inner.group
        self.key = inner.key
        self.attempt = inner.attempt
        self.first_failure_at = inner.first_failure_at

    @property
    def settled(self) -> bool:
        return self._inner.settled


class RecordingDelivery(WrappedDelivery):
    """Settles through the inner delivery, then records the outcome."""

    def __init__(self, inner: Delivery, message_id: str, ledger: LedgerFile) -> None:
        super().__init__(inner)
        self._id = message_id
        self._ledger = ledger

    async def ack(self) -> None:
        try:
            await self._inner.ack()
        except BrokerError as exc:
            self._ledger.record("ack_failed", self._id, error=type(exc).__name__)
            raise
        self._ledger.record("acked", self._id, attempt=self.attempt)

    def start_ack(self) -> asyncio.Future[None] | None:
        # Passed through, so fault tests run the Consumer's own ack path for each backend.
        acking = self._inner.start_ack()
        if acking is not None:
            self._ledger.record("acking", self._id, attempt=self.attempt)
            acking.add_done_callback(self._record_ack)
        return acking

    def _record_ack(self, acking: asyncio.Future[None]) -> None:
        if acking.cancelled():
            return
        error = acking.exception()
        if error is None:
            self._ledger.record("acked", self._id, attempt=self.attempt)
        elif isinstance(error, BrokerError):
            self._ledger.record("ack_failed", self._id, error=type(error).__name__)

    async def nack(self, *, delay: float = 0.0, error: Failure | None = None) -> None:
        await self._inner.nack(delay=delay, error=error)
        self._ledger.record("nacked", self._id, attempt=self.attempt, delay=f"{delay:.4f}")

    async def dead_letter(self, reason: DeadLetterReason, error: Failure | None = None) -> None:
        await self._inner.dead_letter(reason, error)
        self._ledger.record("dead_lettered", self._id, reason=reason.value)
