"""The sagas an orchestrator holds: their leases renewed, and their drivers fenced.

Every write that extends a lease (the claim, each transition, a renewal)
began no earlier than the loop time kept for the saga here, and the lease it
wrote ends ``lease_timeout`` after the store's time during it, so that loop
time + ``lease_timeout`` is a safe local bound of the lease. ``renew``
writes a renewal for the leases no transition extended for a third of
their length; ``fence`` cancels the driver of a saga a sixth of its lease
before that bound, so an orchestrator that takes the saga over never
overlaps with it (docs/saga.md, "One driver per saga").
"""

from __future__ import annotations

import asyncio
import logging

from wirework.errors import WireworkError
from wirework.saga import journal
from wirework.saga.failures import settled
from wirework.store.base import Store

log = logging.getLogger("wirework.saga")


class Leases:
    """The held sagas of one orchestrator (``owner``), by id."""

    def __init__(self, store: Store, owner: str, lease_timeout: float) -> None:
        self.store = store
        self.owner = owner
        self.lease_timeout = lease_timeout
        self.held: dict[str, float] = {}
        """Loop time at which the last write that extended each held saga's lease began."""
        self.fences: dict[str, asyncio.Future[None]] = {}
        """The driving task of each held saga, cancelled when its lease is lost."""

    def hold(self, saga_id: str, asked: float, driving: asyncio.Future[None]) -> None:
        """A saga was claimed by a write begun at loop time ``asked``; ``driving`` drives it."""
        self.held[saga_id] = asked
        self.fences[saga_id] = driving

    def drop(self, saga_id: str) -> bool:
        """Forget a saga no longer driven; whether its lease was still held."""
        self.fences.pop(saga_id, None)
        return self.held.pop(saga_id, None) is not None

    def confirm(self, saga_id: str, asked: float) -> None:
        """A write begun at loop time ``asked`` extended the saga's lease."""
        if saga_id in self.held:
            self.held[saga_id] = max(self.held[saga_id], asked)

    def lose(self, saga_id: str) -> None:
        """The lease is gone or about to be: stop driving the saga."""
        self.held.pop(saga_id, None)
        driving = self.fences.get(saga_id)
        if driving is not None:
            driving.cancel()

    async def renew(self) -> None:
        """Renew, in one transaction, the leases no transition extended for a third of them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.lease_timeout / 6)
            asked = loop.time()
            stale = sorted(
                saga_id
                for saga_id, confirmed in self.held.items()
                if asked - confirmed >= self.lease_timeout / 3
            )
            if not stale:
                continue
            try:
                held = await settled(
                    journal.renew(self.store, stale, self.owner, lease_timeout=self.lease_timeout)
                )
            except WireworkError as exc:
                log.warning("saga orchestrator %s could not renew leases: %s", self.owner, exc)
                continue
            for saga_id in stale:
                if saga_id in held:
                    self.confirm(saga_id, asked)
                elif saga_id in self.held:
                    self.lose(saga_id)

    async def fence(self) -> None:
        """Stop driving a saga a sixth of its lease before the lease could run out (a slow
        store, a paused loop: renewals that do not get through in time)."""
        loop = asyncio.get_running_loop()
        margin = self.lease_timeout / 6
        while True:
            await asyncio.sleep(margin / 2)
            now = loop.time()
            for saga_id, confirmed in list(self.held.items()):
                if now >= confirmed + self.lease_timeout - margin:
                    self.lose(saga_id)
