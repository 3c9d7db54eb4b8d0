"""A Service with a store: idempotent handlers under the inbox, ``ctx.tx``, the outbox relay.

The broker is ``memory://`` and the store a SQLite file: the inbox and outbox
logic is the store's (tested on both stores in ``tests/store``); this proves
the service wires it: the decorator flag, the transaction in ``ctx``, the
relay's life with the service's, and the errors a user meets first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from wirework.brokers import connect
from wirework.envelope import Envelope
from wirework.errors import ConfigurationError, TransactionError
from wirework.service import Context, Service
from wirework.testing.conformance import wait_until


class Pay(BaseModel):
    order_id: str
    cents: int


class Paid(BaseModel):
    order_id: str


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


async def test_a_redelivered_copy_is_acked_without_running_the_handler(store_url: str) -> None:
    broker = connect("memory://")
    svc = Service("payments", broker=broker, store=store_url)
    runs: list[str] = []

    @svc.consume("payments.pay", idempotent=True)
    async def pay(command: Pay, ctx: Context) -> None:
        runs.append(command.order_id)
        await ctx.tx.execute(
            "INSERT INTO payments (order_id, cents) VALUES ($1, $2)",
            command.order_id,
            command.cents,
        )

    async with svc.store.transaction() as tx:
        await tx.execute("CREATE TABLE payments (order_id TEXT, cents INTEGER)")
    async with svc:
        envelope = svc.envelope(Pay(order_id="o-1", cents=500))
        await svc.publish_envelope("payments.pay", envelope)
        await svc.publish_envelope("payments.pay", envelope)  # the same message id again
        await wait_until(lambda: svc.inbox_stats.duplicates == 1, 10, what="duplicate")
        async with svc.store.transaction() as tx:
            rows = await tx.fetch("SELECT order_id, cents FROM payments")
    await broker.aclose()

    assert runs == ["o-1"]
    assert rows == [{"order_id": "o-1", "cents": 500}]
    assert svc.inbox_stats.claimed == 1


async def test_ctx_tx_publish_reaches_subscribers_once_and_not_when_rolled_back(
    store_url: str,
) -> None:
    broker = connect("memory://")
    svc = Service("payments", broker=broker, store=store_url)
    listener = Service("ledger", broker=broker)
    seen: list[tuple[str, str | None]] = []
    attempts: list[int] = []

    @svc.consume("payments.pay", idempotent=True)
    async def pay(command: Pay, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await ctx.tx.publish("payments.events", Paid(order_id=command.order_id))
        if ctx.attempt == 1:
            raise RuntimeError("card network hiccup")  # rolls the event back with the claim

    @listener.subscribe("payments.events")
    async def on_paid(event: Paid, ctx: Context) -> None:
        seen.append((event.order_id, ctx.causation_id))

    async with listener, svc:
        sent = await svc.send("payments.pay", Pay(order_id="o-2", cents=900))
        await wait_until(lambda: len(seen) == 1, 10, what="the relayed event")
        await wait_until(lambda: svc.inbox_stats.claimed == 1, 10, what="the claim")
    await broker.aclose()

    assert attempts == [1, 2]
    assert seen == [("o-2", sent.id)]  # once, caused by the command, from the committed try
    assert svc.inbox_stats.rolled_back == 1


async def test_ctx_tx_outside_an_idempotent_handler_says_how_to_get_one() -> None:
    broker = connect("memory://")
    svc = Service("payments", broker=broker)
    errors: list[Exception] = []

    @svc.consume("payments.pay")
    async def pay(command: Pay, ctx: Context) -> None:
        try:
            ctx.tx  # noqa: B018 - the access is the test
        except TransactionError as exc:
            errors.append(exc)

    async with svc:
        await svc.send("payments.pay", Pay(order_id="o-3", cents=1))
        await wait_until(lambda: bool(errors), 10, what="the handler")
    await broker.aclose()

    assert "idempotent=True" in str(errors[0])


async def test_an_idempotent_handler_without_a_store_fails_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WIREWORK_STORE", raising=False)
    broker = connect("memory://")
    svc = Service("payments", broker=broker)

    @svc.consume("payments.pay", idempotent=True)
    async def pay(command: Pay) -> None:
        return None

    with pytest.raises(ConfigurationError, match="WIREWORK_STORE"):
        await svc.start()
    await broker.aclose()


async def test_the_store_comes_from_wirework_store_and_closes_with_the_service(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREWORK_STORE", store_url)
    broker = connect("memory://")
    svc = Service("payments", broker=broker)

    @svc.consume("payments.pay", idempotent=True)
    async def pay(command: Pay) -> None:
        return None

    async with svc:
        opened = svc.store
        await svc.send("payments.pay", Pay(order_id="o-4", cents=1))
        await wait_until(lambda: svc.inbox_stats.claimed == 1, 10, what="the claim")
    await broker.aclose()

    assert svc.store is not opened  # closed at stop; the next use opens it again
    await svc.store.aclose()


async def test_a_store_named_by_wirework_store_is_relayed_without_idempotent_handlers(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outbox rows written outside any handler reach the broker: the service runs the relay."""
    monkeypatch.setenv("WIREWORK_STORE", store_url)
    broker = connect("memory://")
    svc = Service("payments", broker=broker)
    listener = Service("ledger", broker=broker)
    seen: list[str] = []

    @listener.subscribe("payments.events")
    async def on_paid(event: Paid) -> None:
        seen.append(event.order_id)

    async with listener, svc:
        async with svc.store.transaction() as tx:
            await tx.publish("payments.events", svc.envelope(Paid(order_id="o-5")))
        await wait_until(lambda: seen == ["o-5"], 10, what="the relayed event")
    await broker.aclose()


async def test_use_store_points_a_stopped_service_at_another_store(tmp_path: Path) -> None:
    """The setting changes only while stopped, and an opened store closes with the service."""
    broker = connect("memory://")
    svc = Service("ledger", broker=broker, store=f"sqlite:///{tmp_path / 'first.db'}")
    previous = svc.use_store(f"sqlite:///{tmp_path / 'second.db'}")
    assert previous == f"sqlite:///{tmp_path / 'first.db'}"
    async with svc:
        async with svc.store.transaction() as tx:
            await tx.execute("CREATE TABLE marks (n INTEGER)")
        with pytest.raises(ConfigurationError, match="stop service 'ledger'"):
            svc.use_store(f"sqlite:///{tmp_path / 'third.db'}")
    await broker.aclose()
    assert (tmp_path / "second.db").exists()
    assert not (tmp_path / "first.db").exists()


async def test_declared_groups_keep_what_is_sent_before_the_service_starts(
    tmp_path: Path,
) -> None:
    """``declare()`` makes the groups: what is sent before the workers start waits for them.

    The group starts at ``latest``, so without ``declare()`` it would be made at
    start, after the message, and miss it (as any group does on RabbitMQ, where
    a message reaching an exchange that no queue is bound to is dropped).
    """
    broker = connect(f"sqlite:///{tmp_path / 'broker.db'}")
    worker = Service("printer", broker=broker)
    printed: list[str] = []

    @worker.subscribe("labels.print", start="latest")
    async def print_label(command: Paid, ctx: Context) -> None:
        printed.append(command.order_id)

    sender = Service("orders", broker=broker)
    async with sender:
        await worker.declare()
        await sender.send("labels.print", Paid(order_id="o-1"))
        async with worker:
            await wait_until(lambda: printed == ["o-1"], 10, what="the label sent before start")
    await broker.aclose()


async def test_events_written_in_svc_transaction_are_the_services_and_stamped(
    store_url: str,
) -> None:
    """``svc.transaction()`` gives outbox events the service's source and its stamps (as
    tracing adds its context); a bare ``store.transaction()`` has neither."""
    broker = connect("memory://")
    svc = Service("orders", broker=broker, store=store_url, relay=False)
    seen: list[str] = []

    def stamp(topic: str, envelope: Envelope) -> Envelope:
        seen.append(topic)
        return envelope.model_copy(update={"subject": "stamped"})

    svc.use_outbox_stamp(stamp)
    async with svc.transaction() as tx:
        ours = await tx.publish("orders.placed", Paid(order_id="o-1"))
    with pytest.raises(ConfigurationError, match="needs source="):
        async with svc.store.transaction() as tx:
            await tx.publish("orders.placed", Paid(order_id="o-2"))
    svc.remove_outbox_stamp(stamp)
    async with svc.transaction() as tx:
        plain = await tx.publish("orders.placed", Paid(order_id="o-3"))
    await svc.store.aclose()
    await broker.aclose()
    assert (ours.source, ours.subject, seen) == ("/orders", "stamped", ["orders.placed"])
    assert (plain.source, plain.subject) == ("/orders", None)
