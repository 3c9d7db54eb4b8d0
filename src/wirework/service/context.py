"""What a handler knows about the message it handles, and how it answers back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from wirework.envelope import Envelope
from wirework.store.base import Transaction, current_transaction

if TYPE_CHECKING:
    from wirework.service.service import Service

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Context:
    """The handled message's identity and lineage, and the service to publish through.

    Whatever a handler publishes (through ``ctx`` or the service itself) while
    it runs carries ``causationid`` = this message's id and this message's
    ``correlationid``, so a flow can be followed hop by hop.
    """

    service: Service
    envelope: Envelope
    topic: str
    group: str
    attempt: int
    headers: Mapping[str, str]

    @property
    def message_id(self) -> str:
        return self.envelope.id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlationid or self.envelope.id

    @property
    def causation_id(self) -> str | None:
        return self.envelope.causationid

    @property
    def tx(self) -> Transaction:
        """The inbox's store transaction (handlers declared ``idempotent=True``).

        Write business rows with it, and events with ``ctx.tx.publish(...)``
        (the transactional outbox): they commit with the claim, or not at all.

        Raises:
            TransactionError: the handler is not idempotent, so no transaction is open.
        """
        return self.service.stamp_outbox(current_transaction())

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of this message to this group: use it for side effects
        outside the broker (a payment provider's idempotency key, an upsert's key)."""
        return f"{self.group}:{self.envelope.id}"

    async def publish(
        self, topic: str, event: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        return await self.service.publish(topic, event, key=key, delay=delay)

    async def send(
        self, queue: str, command: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        return await self.service.send(queue, command, key=key, delay=delay)

    async def request(
        self, subject: str, body: BaseModel, *, returns: type[M], timeout: float
    ) -> M:
        return await self.service.request(subject, body, returns=returns, timeout=timeout)

    def extension(self, name: str) -> Any:
        """A CloudEvents extension attribute of the handled message, or None."""
        return self.envelope.extensions.get(name)
