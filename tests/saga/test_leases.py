"""The saga lease's claim, at the journal: a renewed lease is never mistaken for a bogus one."""

from __future__ import annotations

import pytest

from wirework.saga import journal
from wirework.store import Store, Transaction

LEASE = 1.0


async def test_a_lease_renewed_after_a_claimer_read_its_clock_is_not_taken(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimer's clock read before the holder's renewal: the renewed lease ends more than
    ``lease_timeout`` after that reading, which is not a clock gone back, so the saga stays
    the holder's. (On PostgreSQL a claim re-checks the row after waiting for the holder's
    row lock; judged by the clock read before, two orchestrators drove one saga.)"""
    assert await journal.create(store, "s-1", "job", {}, publish=False)
    assert await journal.claim(store, "holder", ["job"], lease_timeout=LEASE, limit=1) == ["s-1"]
    read = store.now

    async def read_before_the_renewal(tx: Transaction) -> float:
        return await read(tx) - LEASE / 2

    monkeypatch.setattr(store, "now", read_before_the_renewal)
    assert await journal.claim(store, "thief", ["job"], lease_timeout=LEASE, limit=1) == []
    assert (await journal.load(store, "s-1")).saga.owner == "holder"


async def test_a_lease_from_a_clock_gone_back_is_taken(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease ending further ahead than any holder could have written it (its clock has
    since gone back by more than a lease) is free to claim, at once."""
    assert await journal.create(store, "s-1", "job", {}, publish=False)
    read = store.now

    async def ahead(tx: Transaction) -> float:
        return await read(tx) + 10 * LEASE

    monkeypatch.setattr(store, "now", ahead)
    assert await journal.claim(store, "holder", ["job"], lease_timeout=LEASE, limit=1) == ["s-1"]
    monkeypatch.setattr(store, "now", read)
    assert await journal.claim(store, "next", ["job"], lease_timeout=LEASE, limit=1) == ["s-1"]


async def test_a_longer_lease_of_another_orchestrator_is_not_taken(store: Store) -> None:
    """Orchestrators with different ``lease_timeout``s share sagas: a lease of 60 s, just
    written, is not "further ahead than a lease" to one that leases for 1 s. Judged by the
    claimer's own length, it was taken at once and two orchestrators drove the saga; the
    renewal and every recorded step keep the holder's length too."""
    assert await journal.create(store, "s-1", "job", {}, publish=False)
    assert await journal.claim(store, "patient", ["job"], lease_timeout=60.0, limit=1) == ["s-1"]
    assert await journal.claim(store, "hasty", ["job"], lease_timeout=LEASE, limit=1) == []
    assert await journal.renew(store, ["s-1"], "patient", lease_timeout=60.0) == {"s-1"}
    assert await journal.claim(store, "hasty", ["job"], lease_timeout=LEASE, limit=1) == []
    assert (await journal.load(store, "s-1")).saga.owner == "patient"


async def test_a_lease_a_moment_ahead_of_the_claimers_clock_is_not_taken(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's clock a little ahead of the one the claim is judged by (on SQLite the
    SQL clock steps by the millisecond, the holder's ``time.time`` by the microsecond): a
    fresh lease then ends a moment beyond its length from the claimer's clock, which is not
    a clock gone back. Without the slack a claim in the same millisecond took it."""
    assert await journal.create(store, "s-1", "job", {}, publish=False)
    read = store.now

    async def a_moment_ahead(tx: Transaction) -> float:
        return await read(tx) + 0.5

    monkeypatch.setattr(store, "now", a_moment_ahead)
    assert await journal.claim(store, "holder", ["job"], lease_timeout=LEASE, limit=1) == ["s-1"]
    monkeypatch.setattr(store, "now", read)
    assert await journal.claim(store, "next", ["job"], lease_timeout=LEASE, limit=1) == []
