"""Checks of the broker contract itself (``wirework.brokers.base``, points 1-8).

Each check is an async function of a fresh ``ConformanceTarget``; it raises
``AssertionError`` (or the unexpected error) when the backend breaks the
contract, and its docstring says, in one sentence, what passing proves.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from itertools import pairwise

from wirework.brokers.base import DeadLetterReason, Delivery, Failure, Subscription
from wirework.envelope import WireMessage
from wirework.errors import (
    AlreadySettledError,
    BrokerClosedError,
    ConfigurationError,
    DeadLetterNotFoundError,
    MessageTooLargeError,
)
from wirework.testing.conformance.support import (
    SHORT_LEASE,
    Item,
    create_groups,
    dead_letter_store,
    group_stats,
    ids,
    inspectable,
    item,
    message_id,
    next_delivery,
    raises,
    same_time,
    settle_stale,
    stats_row,
    subscribed,
    take,
    wait_for_backlog,
    wait_for_group,
    wait_until,
)
from wirework.testing.conformance.target import ConformanceTarget

#: A published time may be read back this much early (timestamp precision of a store).
_TIME_TOLERANCE = 0.05


def _expected(count: int) -> list[str | None]:
    """The ids of ``item(0)`` to ``item(count - 1)``, in publish order."""
    return [f"m{n}" for n in range(count)]


# -- 1. fan-out, competing consumers -------------------------------------------------------


async def check_fan_out_to_every_group(target: ConformanceTarget) -> None:
    """Every group subscribed to a topic receives every message, in publish order."""
    broker = await target.open()
    topic = "conformance.fanout"
    first = Subscription(topic=topic, group="first")
    second = Subscription(topic=topic, group="second")
    async with (
        subscribed(broker, first) as to_first,
        subscribed(broker, second) as to_second,
        asyncio.TaskGroup() as tasks,
    ):
        got_first = tasks.create_task(take(to_first, 10, ack=True))
        got_second = tasks.create_task(take(to_second, 10, ack=True))
        await wait_for_group(broker, first)
        await wait_for_group(broker, second)
        for n in range(10):
            await broker.publish(topic, item(n))
    assert ids(got_first.result()) == _expected(10), "group 'first' missed or reordered messages"
    assert ids(got_second.result()) == _expected(10), "group 'second' missed or reordered messages"


async def check_competing_consumers_share_a_group(target: ConformanceTarget) -> None:
    """Competing consumers of one group work at once on different messages, each message once."""
    brokers = {"first": await target.open(), "second": await target.open()}
    topic, count = "conformance.compete", 40
    subscription = Subscription(topic=topic, group="workers", prefetch=1)
    for n in range(count):
        await brokers["first"].publish(topic, item(n))
    received: dict[str, list[str | None]] = {"first": [], "second": []}
    acked: list[str | None] = []

    async def work(name: str) -> None:
        async with subscribed(brokers[name], subscription) as deliveries:
            async for delivery in deliveries:
                received[name].append(message_id(delivery))
                if len(received[name]) == 1:
                    # Hold the first delivery until the other consumer holds one too.
                    await wait_until(
                        lambda: all(received.values()),
                        what="both consumers holding a message at the same time",
                    )
                await delivery.ack()
                acked.append(message_id(delivery))

    async with asyncio.TaskGroup() as tasks:
        workers = [tasks.create_task(work(name)) for name in brokers]
        await wait_until(lambda: len(acked) >= count, what=f"{count} messages acked")
        for worker in workers:
            worker.cancel()
    everything = received["first"] + received["second"]
    repeated = [i for i, seen in Counter(everything).items() if seen > 1]
    assert not repeated, f"delivered to more than one consumer (or twice): {repeated}"
    assert sorted(everything, key=str) == sorted(_expected(count), key=str)
    assert all(received.values()), f"one consumer got nothing: {received}"
    await wait_for_backlog(brokers["first"], topic, "workers", 0)


# -- 2. durability ------------------------------------------------------------------------


async def check_publish_is_durable(target: ConformanceTarget) -> str:
    """``publish`` has stored the message when it returns; a persistent one survives aclose().

    Returns what was proved: an in-process backend can show only the first half.
    """
    broker = await target.open()
    topic = "conformance.durable"
    await broker.publish(topic, item(1))
    row = await stats_row(broker, topic, None)
    assert row.ready == 1, f"not in stats() when publish returned: {row}"
    if not target.persistent:
        return "the message was in stats() when publish returned (nothing outlives this backend)"
    await broker.aclose()
    reopened = await target.open()
    async with subscribed(reopened, Subscription(topic=topic, group="after")) as deliveries:
        [delivery] = await take(deliveries, 1, ack=True)
    assert message_id(delivery) == "m1"
    return "a message published before aclose() was delivered by a broker opened afterwards"


# -- 3. ack, nack, dead letters ------------------------------------------------------------


async def check_ack_removes_the_message(target: ConformanceTarget) -> None:
    """An acked message leaves its group for good: the backlog empties and it never comes back.
    An ack of a delivery that holds its message is not counted as stale."""
    broker = await target.open()
    topic = "conformance.ack"
    for n in range(3):
        await broker.publish(topic, item(n))
    async with subscribed(broker, Subscription(topic=topic, group="g")) as deliveries:
        await take(deliveries, 3, ack=True)
        await wait_for_backlog(broker, topic, "g", 0)
        # Anything acked but redelivered would arrive before this later message.
        await broker.publish(topic, item(3))
        assert ids(await take(deliveries, 1, ack=True)) == ["m3"]
    assert broker.stale_settles == 0, "current acks were counted as stale"


async def check_start_ack_is_an_ack_begun(target: ConformanceTarget) -> None:
    """``start_ack`` either settles at once and its future ending is the ack (the message is
    gone for good), or returns None and leaves the delivery to ``ack()``."""
    broker = await target.open()
    topic = "conformance.start_ack"
    for n in range(3):
        await broker.publish(topic, item(n))
    async with subscribed(broker, Subscription(topic=topic, group="g")) as deliveries:
        begun, *others = await take(deliveries, 3)
        acking = begun.start_ack()
        if acking is None:
            assert not begun.settled, "start_ack returned None, yet settled the delivery"
            await begun.ack()
        else:
            assert begun.settled, "start_ack began an ack without settling the delivery"
            with raises(AlreadySettledError, "start_ack twice"):
                begun.start_ack()
            await acking
        for other in others:
            await other.ack()
        await wait_for_backlog(broker, topic, "g", 0)
        # An ack begun but not held would bring its message back before this later one.
        await broker.publish(topic, item(3))
        assert ids(await take(deliveries, 1, ack=True)) == ["m3"]


async def check_failures_keep_attempts_and_times(target: ConformanceTarget) -> None:
    """nack brings a message back with attempt + 1 and its first failure time kept, and the
    dead-letter record carries attempts, first and last failure time and the last error."""
    broker = await target.open()
    topic = "conformance.failures"
    published = item(1)
    await broker.publish(topic, published)
    async with subscribed(broker, Subscription(topic=topic, group="g", prefetch=1)) as deliveries:
        [first] = await take(deliveries, 1)
        assert (first.attempt, first.first_failure_at) == (1, None)
        await first.nack(error=Failure(error_type="test.Boom", message="first"))
        [second] = await take(deliveries, 1)
        assert (message_id(second), second.attempt) == ("m1", 2)
        failed_at = second.first_failure_at
        assert failed_at is not None, "first_failure_at not set by a nack with an error"
        await second.nack(error=Failure(error_type="test.Boom", message="second"))
        [third] = await take(deliveries, 1)
        assert third.attempt == 3
        assert same_time(third.first_failure_at, failed_at), "first_failure_at changed"
        await third.dead_letter(
            DeadLetterReason.MAX_DELIVERIES, Failure(error_type="test.Boom", message="third")
        )
    [record] = await dead_letter_store(broker).dead_letters(topic=topic)
    assert (record.topic, record.group, record.message_id) == (topic, "g", "m1")
    assert (record.reason, record.attempts) == (DeadLetterReason.MAX_DELIVERIES, 3)
    assert same_time(record.first_failure_at, failed_at)
    assert record.last_failure_at >= record.first_failure_at
    assert record.error == Failure(error_type="test.Boom", message="third")
    assert dict(record.message.headers) == dict(published.headers)
    assert record.message.body == published.body
    row = await wait_for_backlog(broker, topic, "g", 0)
    assert row.dead_lettered == 1


async def check_dead_letters_list_filter_and_get(target: ConformanceTarget) -> None:
    """Dead letters are listed oldest first, filtered by topic, group and reason, limited,
    and read by id; an unknown id raises DeadLetterNotFoundError."""
    broker = await target.open()
    store = dead_letter_store(broker)
    topic, other = "conformance.dlq", "conformance.dlq-other"
    # prefetch=1: each step takes one message, and nothing else waits in a left subscription.
    a = Subscription(topic=topic, group="a", prefetch=1)
    b = Subscription(topic=topic, group="b", prefetch=1)
    a_other = Subscription(topic=other, group="a", prefetch=1)
    await create_groups(broker, a, b, a_other)
    await broker.publish(topic, item(1))
    await broker.publish(topic, item(2))
    await broker.publish(other, item(3))
    plan = [
        (a, DeadLetterReason.REJECTED),
        (a, DeadLetterReason.MAX_DELIVERIES),
        (b, DeadLetterReason.SCHEMA_VALIDATION),
        (a_other, DeadLetterReason.REJECTED),
    ]
    done: list[tuple[str, str, str | None]] = []
    for subscription, reason in plan:
        async with subscribed(broker, subscription) as deliveries:
            [delivery] = await take(deliveries, 1)
            await delivery.dead_letter(reason, Failure(error_type="test.Bad", message=reason))
            done.append((subscription.topic, subscription.group, message_id(delivery)))
    everything = await store.dead_letters()
    assert [(r.topic, r.group, r.message_id) for r in everything] == done, "not oldest first"
    assert len({r.id for r in everything}) == 4, "dead-letter ids are not unique"
    assert all(x.dead_lettered_at <= y.dead_lettered_at for x, y in pairwise(everything))
    assert len(await store.dead_letters(topic=topic)) == 3
    assert len(await store.dead_letters(group="a")) == 3
    assert len(await store.dead_letters(topic=topic, group="a")) == 2
    assert len(await store.dead_letters(reason=DeadLetterReason.REJECTED)) == 2
    [schema] = await store.dead_letters(topic=topic, reason=DeadLetterReason.SCHEMA_VALIDATION)
    assert schema.group == "b"
    assert [r.id for r in await store.dead_letters(limit=2)] == [r.id for r in everything[:2]]
    for record in everything:
        assert await store.dead_letter(record.id) == record
    with raises(DeadLetterNotFoundError, "dead_letter() of an unknown id"):
        await store.dead_letter("no-such-dead-letter")


async def check_replay_returns_to_the_original_group_only(target: ConformanceTarget) -> None:
    """Replay hands a dead letter back to the group that failed it alone, with its id, body
    and key, attempt count reset; an unknown id in the batch moves nothing."""
    broker = await target.open()
    store = dead_letter_store(broker)
    topic = "conformance.replay"
    failing = Subscription(topic=topic, group="failing", prefetch=1)
    fine = Subscription(topic=topic, group="fine")
    await create_groups(broker, failing, fine)
    published = item(1, key="order-1")
    await broker.publish(topic, published, key="order-1")
    async with subscribed(broker, fine) as deliveries:
        await take(deliveries, 1, ack=True)
    async with subscribed(broker, failing) as deliveries:
        [delivery] = await take(deliveries, 1)
        await delivery.nack(error=Failure(error_type="test.Boom", message="once"))
        [delivery] = await take(deliveries, 1)
        await delivery.dead_letter(DeadLetterReason.REJECTED)
    [record] = await store.dead_letters(topic=topic)
    assert record.attempts == 2
    with raises(DeadLetterNotFoundError, "replay() of a batch with an unknown id"):
        await store.replay([record.id, "no-such-dead-letter"])
    assert await store.dead_letter(record.id) == record, "a failed replay moved the record"
    assert await store.replay([record.id]) == 1
    assert await store.dead_letters(topic=topic) == []
    row = await wait_for_backlog(broker, topic, "fine", 0)
    assert row.dead_lettered == 0
    async with subscribed(broker, failing) as deliveries:
        [again] = await take(deliveries, 1, ack=True)
    assert (message_id(again), again.attempt, again.key) == ("m1", 1, "order-1")
    assert (dict(again.message.headers), again.message.body) == (
        dict(published.headers),
        published.body,
    )
    await wait_for_backlog(broker, topic, "failing", 0)
    assert (await wait_for_backlog(broker, topic, "fine", 0)).backlog == 0


# -- 4. leases -----------------------------------------------------------------------------


async def check_lease_expiry_redelivers_to_another_consumer(target: ConformanceTarget) -> None:
    """A delivery left unsettled past its lease goes to another consumer with attempt + 1,
    and the late holder's ack does not remove the newer delivery."""
    crashed_broker, surviving_broker = await target.open(), await target.open()
    topic = "conformance.lease"
    subscription = Subscription(topic=topic, group="g", lease_timeout=SHORT_LEASE, prefetch=1)
    await crashed_broker.publish(topic, item(1))
    loop = asyncio.get_running_loop()
    async with subscribed(crashed_broker, subscription) as crashed:
        [stale] = await take(crashed, 1)
        taken_at = loop.time()
        async with subscribed(surviving_broker, subscription) as surviving:
            [fresh] = await take(surviving, 1)
            waited = loop.time() - taken_at
            assert (message_id(fresh), fresh.attempt) == ("m1", 2)
            assert waited >= SHORT_LEASE - _TIME_TOLERANCE, f"redelivered after {waited:.3f}s"
            await settle_stale(crashed_broker, stale.ack())
            await fresh.nack()
            [again] = await take(surviving, 1, ack=True)
            assert (message_id(again), again.attempt) == ("m1", 3)
    await wait_for_backlog(surviving_broker, topic, "g", 0)


async def check_leaving_a_subscription_hands_deliveries_back(target: ConformanceTarget) -> None:
    """Leaving an iteration, by aclose() or by cancellation, hands back at once (long before
    the lease) what it held, including what it fetched but never yielded; the deliveries it
    yielded come again with attempt + 1."""
    broker = await target.open()
    topic = "conformance.release"
    subscription = Subscription(topic=topic, group="g", prefetch=3, lease_timeout=300)
    for n in range(3):
        await broker.publish(topic, item(n))
    async with subscribed(broker, subscription) as deliveries:
        left = await take(deliveries, 2)  # m2 may wait in a backend's prefetch buffer meanwhile
    await settle_stale(broker, left[0].ack())  # too late: m0 was handed back, and must stay so
    # Nor may a late nack record its failure on the message handed back.
    await settle_stale(broker, left[1].nack(error=Failure(error_type="x.Late", message="late")))
    held: list[Delivery] = []

    async def hold() -> None:
        async for delivery in broker.subscribe(subscription):
            held.append(delivery)

    async with asyncio.TaskGroup() as tasks:
        holder = tasks.create_task(hold())
        await wait_until(lambda: len(held) == 3, what="a second subscription taking all back")
        holder.cancel()
    assert [(message_id(d), d.attempt) for d in held[:2]] == [("m0", 2), ("m1", 2)]
    assert held[1].first_failure_at is None, "a stale nack recorded its failure"
    async with subscribed(broker, subscription) as deliveries:
        again = await take(deliveries, 3, ack=True)
    attempts = {message_id(d): d.attempt for d in again}
    assert sorted(attempts, key=str) == _expected(3)
    assert (attempts["m0"], attempts["m1"]) == (3, 3), attempts


# -- 5. bytes travel unchanged -------------------------------------------------------------


async def check_undecodable_bytes_arrive_unchanged(target: ConformanceTarget) -> None:
    """Headers and body arrive byte for byte, whatever they hold (decoding is not its job)."""
    broker = await target.open()
    topic = "conformance.bytes"
    sent = [
        WireMessage(headers={}, body=b"\xff\xfe\x00\x01 not json"),
        WireMessage(
            headers={"ce-id": "odd", "ce-type": "x", "content-type": "application/json"},
            body=b'{"truncated',
        ),
        WireMessage(headers={}, body=b""),
        WireMessage(headers={"x-note": "caf\u00e9 \u2713"}, body=bytes(range(256))),
    ]
    for message in sent:
        await broker.publish(topic, message)
    async with subscribed(broker, Subscription(topic=topic, group="g")) as deliveries:
        got = await take(deliveries, len(sent), ack=True)
    assert [(dict(d.message.headers), d.message.body) for d in got] == [
        (dict(m.headers), m.body) for m in sent
    ]


# -- 6. per-key order ----------------------------------------------------------------------


async def check_key_order_with_competing_consumers(target: ConformanceTarget) -> None:
    """Under three competing consumers a key's messages are never in flight together and
    arrive in publish order, while the keys progress side by side."""
    brokers = [await target.open(), await target.open(), await target.open()]
    topic, keys, per_key = "conformance.keys", ["k0", "k1", "k2", "k3"], 8
    for n in range(len(keys) * per_key):
        key = keys[n % len(keys)]
        await brokers[0].publish(topic, item(n, key=key), key=key)
    subscription = Subscription(topic=topic, group="g", prefetch=4)
    rng = random.Random(7)
    in_flight: set[str | None] = set()
    overlaps: list[str | None] = []
    arrived: dict[str | None, list[int]] = defaultdict(list)
    done: list[int] = []

    async def handle(delivery: Delivery) -> None:
        if delivery.key in in_flight:
            overlaps.append(message_id(delivery))
        in_flight.add(delivery.key)
        number = Item.model_validate_json(delivery.message.body).n
        arrived[delivery.key].append(number)
        await asyncio.sleep(rng.uniform(0, 0.003))  # stands for work, so that handlers overlap
        in_flight.discard(delivery.key)  # before the ack: the next may arrive while it runs
        await delivery.ack()
        done.append(number)

    async def consume(index: int) -> None:
        async with (
            subscribed(brokers[index], subscription) as deliveries,
            asyncio.TaskGroup() as handlers,
        ):
            async for delivery in deliveries:
                handlers.create_task(handle(delivery))

    async with asyncio.TaskGroup() as tasks:
        consumers = [tasks.create_task(consume(i)) for i in range(len(brokers))]
        await wait_until(lambda: len(done) == len(keys) * per_key, what="every message acked")
        for consumer in consumers:
            consumer.cancel()
    assert not overlaps, f"messages in flight together with an earlier one of their key: {overlaps}"
    for index, key in enumerate(keys):
        published = list(range(index, len(keys) * per_key, len(keys)))
        assert arrived[key] == published, f"key {key} arrived as {arrived[key]}"


async def check_no_head_of_line_blocking_across_keys(target: ConformanceTarget) -> None:
    """A message waiting behind its key holds back neither other keys nor keyless messages."""
    broker = await target.open()
    topic = "conformance.hol"
    for n, key in [(1, "a"), (2, "a"), (3, "b"), (4, None)]:
        await broker.publish(topic, item(n, key=key), key=key)
    async with subscribed(broker, Subscription(topic=topic, group="g", prefetch=10)) as deliveries:
        first = await take(deliveries, 3)
        assert sorted(ids(first), key=str) == ["m1", "m3", "m4"], f"got {ids(first)}"
        for delivery in first:
            await delivery.ack()
        assert ids(await take(deliveries, 1, ack=True)) == ["m2"]


# -- 7. delays -----------------------------------------------------------------------------


async def check_delayed_delivery(target: ConformanceTarget) -> None:
    """A delayed message (publish or nack delay) arrives neither before its delay nor long
    after it, and holds back nothing published without a delay."""
    broker = await target.open()
    topic, delay = "conformance.delay", 0.5
    subscription = Subscription(topic=topic, group="g")
    await create_groups(broker, subscription)
    loop = asyncio.get_running_loop()
    published_at = loop.time()
    await broker.publish(topic, item(1), delay=delay)
    await broker.publish(topic, item(2))
    row = await stats_row(broker, topic, "g")
    assert (row.delayed, row.ready) == (1, 1), f"stats: {row}"
    # No sleep is needed to show "not before": the arrival time of each delivery says it.
    async with subscribed(broker, subscription) as deliveries:
        assert ids(await take(deliveries, 1, ack=True)) == ["m2"]
        [delayed] = await take(deliveries, 1)
        waited = loop.time() - published_at
        assert message_id(delayed) == "m1"
        assert delay - _TIME_TOLERANCE <= waited <= delay + 1.0, f"arrived after {waited:.3f}s"
        nacked_at = loop.time()
        await delayed.nack(delay=delay)
        row = await stats_row(broker, topic, "g")
        assert row.delayed == 1, f"stats after nack(delay=...): {row}"
        [again] = await take(deliveries, 1, ack=True)
        waited = loop.time() - nacked_at
        assert again.attempt == 2
        assert delay - _TIME_TOLERANCE <= waited <= delay + 1.0, f"came back after {waited:.3f}s"


# -- 8. prefetch and backlog ---------------------------------------------------------------


async def check_prefetch_bounds_a_subscription(target: ConformanceTarget) -> None:
    """A subscription never holds more than ``prefetch`` unsettled deliveries: the backlog
    stays in the broker (stats shows it), where another consumer takes it."""
    slow_broker, fast_broker = await target.open(), await target.open()
    topic, count, prefetch = "conformance.prefetch", 20, 3
    subscription = Subscription(topic=topic, group="g", prefetch=prefetch)
    for n in range(count):
        await slow_broker.publish(topic, item(n))
    async with subscribed(slow_broker, subscription) as slow:
        await take(slow, prefetch)
        row = await stats_row(slow_broker, topic, "g")
        assert (row.in_flight, row.ready) == (prefetch, count - prefetch), row
        async with asyncio.TaskGroup() as tasks:
            beyond = tasks.create_task(next_delivery(slow))
            await asyncio.sleep(0)  # let the slow subscription start asking for more
            async with subscribed(fast_broker, subscription) as fast:
                await take(fast, count - prefetch, ack=True)
            assert not beyond.done(), "the slow subscription took more than prefetch"
            beyond.cancel()
    # Leaving the slow subscription handed back the deliveries it held.
    async with subscribed(fast_broker, subscription) as fast:
        again = await take(fast, prefetch, ack=True)
    assert [d.attempt for d in again] == [2] * prefetch
    await wait_for_backlog(fast_broker, topic, "g", 0)


# -- group creation and retention ----------------------------------------------------------


async def check_start_position_earliest_and_latest(target: ConformanceTarget) -> None:
    """A new ``earliest`` group gets what the topic still keeps; a new ``latest`` group only
    what is published after it exists."""
    broker = await target.open()
    topic = "conformance.start"
    early = Subscription(topic=topic, group="early", start="earliest")
    late = Subscription(topic=topic, group="late", start="latest")
    await broker.publish(topic, item(1))
    async with (
        subscribed(broker, early) as to_early,
        subscribed(broker, late) as to_late,
        asyncio.TaskGroup() as tasks,
    ):
        assert ids(await take(to_early, 1, ack=True)) == ["m1"]
        got_late = tasks.create_task(take(to_late, 1, ack=True))
        await wait_for_group(broker, late)
        await broker.publish(topic, item(2))
        assert ids(await take(to_early, 1, ack=True)) == ["m2"]
    assert ids(got_late.result()) == ["m2"], "a latest group got a message older than itself"


async def check_nothing_is_kept_after_every_group_acks(target: ConformanceTarget) -> None:
    """Once every group has acked a message the broker keeps nothing of it: backlogs are
    empty and a group created afterwards with ``start="earliest"`` finds nothing."""
    broker = await target.open()
    topic = "conformance.retention"
    groups = [Subscription(topic=topic, group=name) for name in ("a", "b")]
    await create_groups(broker, *groups)
    for n in range(10):
        await broker.publish(topic, item(n))
    for subscription in groups:
        async with subscribed(broker, subscription) as deliveries:
            await take(deliveries, 10, ack=True)
        row = await wait_for_backlog(broker, topic, subscription.group, 0)
        assert row.dead_lettered == 0
    newcomer = Subscription(topic=topic, group="newcomer", start="earliest")
    await create_groups(broker, newcomer)
    await wait_for_backlog(broker, topic, "newcomer", 0)


# -- errors every backend raises -----------------------------------------------------------


async def check_oversized_publish_is_refused(target: ConformanceTarget) -> None:
    """A message over ``max_message_bytes`` raises MessageTooLargeError and stores nothing,
    while one exactly at the limit is accepted."""
    limit = 2048
    broker = await target.open(max_message_bytes=limit)
    assert broker.max_message_bytes == limit
    topic = "conformance.size"

    def sized(size: int) -> WireMessage:
        return WireMessage(headers={"ce-id": "big"}, body=b"x" * (size - len("ce-id") - 3))

    with raises(MessageTooLargeError, "publish of limit + 1 bytes"):
        await broker.publish(topic, sized(limit + 1))
    row = await group_stats(broker, topic, None)
    assert row is None or row.backlog == 0, f"a refused message was stored: {row}"
    await broker.publish(topic, sized(limit))
    assert (await stats_row(broker, topic, None)).ready == 1


async def check_invalid_topic_name_is_refused(target: ConformanceTarget) -> None:
    """A topic name outside ``[A-Za-z0-9._-]{1,200}`` raises ConfigurationError, storing nothing."""
    broker = await target.open()
    for name in ["", "has space", "a/b", "orders.*", "orders.>", "a:b", "caf\u00e9", "x" * 201]:
        with raises(ConfigurationError, f"publish to topic {name!r}"):
            await broker.publish(name, item(1))
    topics = {row.topic for row in await inspectable(broker).stats()}
    assert not topics, f"refused publishes created topics: {topics}"


async def check_settling_twice_raises(target: ConformanceTarget) -> None:
    """A delivery settles once: a second ack, nack or dead_letter raises AlreadySettledError."""
    broker = await target.open()
    topic = "conformance.twice"
    for n in range(3):
        await broker.publish(topic, item(n))
    async with subscribed(broker, Subscription(topic=topic, group="g")) as deliveries:
        acked, nacked, dead = await take(deliveries, 3)
        await acked.ack()
        await nacked.nack()
        await dead.dead_letter(DeadLetterReason.REJECTED)
        assert [acked.settled, nacked.settled, dead.settled] == [True, True, True]
        with raises(AlreadySettledError, "ack after ack"):
            await acked.ack()
        with raises(AlreadySettledError, "ack after nack"):
            await nacked.ack()
        with raises(AlreadySettledError, "nack after dead_letter"):
            await dead.nack()
        assert ids(await take(deliveries, 1, ack=True)) == ids([nacked])
    row = await wait_for_backlog(broker, topic, "g", 0)
    assert row.dead_lettered == 1


async def check_closed_broker_ends_subscriptions_and_refuses_calls(
    target: ConformanceTarget,
) -> None:
    """aclose() ends running subscriptions, makes publish and subscribe raise
    BrokerClosedError, and may be called twice."""
    broker = await target.open()
    topic = "conformance.closed"
    subscription = Subscription(topic=topic, group="g")

    async def iterate() -> None:
        async for _ in broker.subscribe(subscription):
            pass

    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(iterate())
        await wait_for_group(broker, subscription)
        await broker.aclose()
        await wait_until(running.done, what="the subscription ending after aclose()")
    with raises(BrokerClosedError, "publish after aclose()"):
        await broker.publish(topic, item(1))
    with raises(BrokerClosedError, "subscribe after aclose()"):
        async for _ in broker.subscribe(subscription):
            pass
    await broker.aclose()
