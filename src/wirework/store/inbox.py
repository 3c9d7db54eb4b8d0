"""The inbox: a consume middleware that makes a handler's stored effects happen once.

For each message it opens a store transaction, inserts the claim
``(group, message id)`` under a unique constraint, runs the handler inside
that same transaction, and commits; only then does the consumer ack. So the
claim and the handler's writes commit together or not at all
(RELIABILITY.md lesson 2, P3):

* a redelivery of a handled message finds the claim and is acked without
  running the handler (counted in ``InboxStats.duplicates``);
* a handler that fails rolls back its writes *and* the claim, so the
  redelivery runs it again;
* two consumers handed the same message at once (a lease that ran out, a
  duplicate publish) never both apply it: on PostgreSQL the second claim waits
  for the first transaction and becomes a duplicate when it commits; on
  SQLite write transactions never overlap.

Effects outside the transaction (an HTTP call, an email) are still at least
once; the handler gets a stable key for them (``ctx.idempotency_key``).
Claims are kept until ``prune_inbox`` removes them (7 days is NServiceBus's
default): a copy redelivered after its claim was pruned runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from wirework.consumer import ConsumeApp, ConsumeMiddleware, Incoming
from wirework.faults import fault_point
from wirework.store.base import Store

log = logging.getLogger("wirework.store.inbox")

#: Key of the open transaction in ``Incoming.items``.
TRANSACTION_ITEM = "wirework.transaction"

DEFAULT_RETENTION = timedelta(days=7)


@dataclass
class InboxStats:
    """Counts since start, shared by every ``Inbox`` built with the same object."""

    claimed: int = 0
    """Messages whose handler ran and committed."""
    duplicates: int = 0
    """Messages acked without running the handler: their claim was there already."""
    rolled_back: int = 0
    """Handler runs whose transaction rolled back (the message will be redelivered)."""


class Inbox:
    """The middleware (Starlette's shape: wraps ``app``); build it with ``inbox_middleware``."""

    def __init__(
        self,
        app: ConsumeApp,
        *,
        store: Store,
        group: str,
        stats: InboxStats | None = None,
        when: Callable[[Incoming], bool] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.group = group
        self.stats = stats or InboxStats()
        self.when = when

    async def __call__(self, incoming: Incoming) -> None:
        if self.when is not None and not self.when(incoming):
            await self.app(incoming)
            return
        message_id = incoming.envelope.id
        try:
            async with self.store.transaction() as tx:
                if not await tx.claim(self.group, message_id):
                    self.stats.duplicates += 1
                    log.info(
                        "%s on %s/%s was handled before: acked without running the handler",
                        message_id,
                        incoming.delivery.topic,
                        self.group,
                    )
                    return
                fault_point("consume.after_inbox_claim")
                incoming.items[TRANSACTION_ITEM] = tx
                try:
                    await self.app(incoming)
                finally:
                    incoming.items.pop(TRANSACTION_ITEM, None)
                fault_point("consume.after_effect_write")
        except BaseException:
            self.stats.rolled_back += 1
            raise
        self.stats.claimed += 1


def inbox_middleware(
    store: Store,
    group: str,
    *,
    stats: InboxStats | None = None,
    when: Callable[[Incoming], bool] | None = None,
) -> ConsumeMiddleware:
    """The inbox for consumer group ``group``, as a ``ConsumeMiddleware``.

    Put it innermost (last in ``middleware=``) so that only the handler runs
    inside the transaction. The handler reaches the transaction through
    ``wirework.store.current_transaction()`` (or ``incoming.items[TRANSACTION_ITEM]``).

    Args:
        store: where claims and the handler's writes commit.
        group: the consumer group; claims are per group and message id.
        stats: counts to update (shared by every consumer given the same object).
        when: if given, only messages it returns True for go through the
            inbox (say, the routes marked ``idempotent=True``); the rest run
            without a transaction.
    """

    def wrap(app: ConsumeApp) -> ConsumeApp:
        return Inbox(app, store=store, group=group, stats=stats, when=when)

    return wrap


async def prune_inbox(
    store: Store, *, older_than: timedelta = DEFAULT_RETENTION, group: str | None = None
) -> int:
    """Delete claims older than ``older_than`` (of one group, or all); returns how many.

    A message redelivered after its claim is gone runs its handler again, so
    keep claims longer than any redelivery can come (a broker's retention,
    a dead-letter replay).
    """
    async with store.transaction() as tx:
        cutoff = await store.now(tx) - older_than.total_seconds()
        if group is None:
            return await tx.execute("DELETE FROM wirework_inbox WHERE handled_at < $1", cutoff)
        return await tx.execute(
            "DELETE FROM wirework_inbox WHERE handled_at < $1 AND consumer_group = $2",
            cutoff,
            group,
        )
