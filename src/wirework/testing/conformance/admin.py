"""Checks of the optional capabilities every shipped backend also offers."""

from __future__ import annotations

from wirework.brokers.base import GroupAdmin, Inspectable, Subscription
from wirework.testing.conformance.support import (
    item,
    subscribed,
    take,
    wait_for_backlog,
    wait_until,
)
from wirework.testing.conformance.target import ConformanceTarget


async def check_declare_and_delete_groups(target: ConformanceTarget) -> None:
    """Declared groups exist at once (and re-declaring changes nothing); deleting a group drops
    its undelivered messages and its stats row, leaves the other groups of the topic untouched,
    and forgets the topic with its last group."""
    broker = await target.open()
    assert isinstance(broker, GroupAdmin), f"{target.name} does not implement GroupAdmin"
    assert isinstance(broker, Inspectable)
    topic = "conformance.admin"
    doomed = Subscription(topic=topic, group="doomed")
    kept = Subscription(topic=topic, group="kept")
    await broker.declare_group(doomed)
    await broker.declare_group(kept)
    await broker.declare_group(kept)  # declaring again changes nothing
    for n in range(5):
        await broker.publish(topic, item(n))
    await wait_for_backlog(broker, topic, "doomed", 5)
    await broker.delete_group(topic, "doomed")
    await broker.delete_group(topic, "never-existed")  # absent: no error

    async def groups_of_topic() -> set[str | None]:
        return {row.group for row in await broker.stats() if row.topic == topic}

    rows: list[set[str | None]] = []

    async def only_kept() -> bool:
        rows.append(await groups_of_topic())
        return rows[-1] == {"kept"}

    await wait_until(only_kept, what="the deleted group gone from stats, the other kept")
    await broker.publish(topic, item(5))
    async with subscribed(broker, kept) as deliveries:
        got = await take(deliveries, 6, ack=True)
    assert sorted(d.message.message_id or "" for d in got) == [f"m{n}" for n in range(6)]
    await broker.delete_group(topic, "kept")

    async def topic_gone() -> bool:
        return not await groups_of_topic()

    await wait_until(topic_gone, what="the topic forgotten with its last group")
