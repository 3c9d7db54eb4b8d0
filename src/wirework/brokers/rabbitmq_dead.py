"""Dead letters of the RabbitMQ backend: one queue of records per group, read and replayed.

A record is the dead-lettered message itself (its headers and body as
published) with the record's fields in wirework's state header, in the
group's ``<ns>:g:<topic>:<group>:dead`` quorum queue: written with publisher
confirms *before* the original delivery is acked, so a crash in between
duplicates a record and never loses one. Its id names its queue
(``<uuid>:<topic>:<group>``), so ``get`` and ``replay`` read one queue only.

Listing reads (browses) the queues, so it costs a round trip per record;
records are ordered by the time they were dead-lettered (queue order within a
group). A replay finds every id first, holding the records it read, so that an
unknown id moves nothing; then each message is sent back to its group's own
queue (with its id and key, attempts reset), confirmed, and only then is its
record removed.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence

from aiormq.abc import DeliveredMessage

from wirework.brokers.base import DeadLetter, DeadLetterReason
from wirework.brokers.rabbitmq_names import (
    Meta,
    dead_letter_from,
    outgoing_headers,
    parse_dead_letter_id,
    partition_kind,
    split_headers,
)
from wirework.brokers.rabbitmq_topology import Browse, Mode, Topology
from wirework.envelope import WireMessage
from wirework.errors import BrokerError, BrokerUnavailableError, DeadLetterNotFoundError


def records(messages: Sequence[DeliveredMessage]) -> list[tuple[DeliveredMessage, DeadLetter]]:
    """The dead-letter records among browsed messages (anything else is skipped)."""
    found = []
    for message in messages:
        user, state, _ = split_headers(message.header.properties.headers)
        try:
            record = dead_letter_from(WireMessage(headers=user.headers, body=message.body), state)
        except (KeyError, TypeError, ValueError):
            continue
        found.append((message, record))
    return found


async def list_dead_letters(
    topology: Topology,
    topic: str | None,
    group: str | None,
    reason: DeadLetterReason | None,
    limit: int,
) -> list[DeadLetter]:
    """Records of every dead-letter queue in the catalog that matches, oldest first."""
    names, catalog = topology.names, await topology.catalog()
    queues = [
        names.dead(t, g) for t, g in catalog.dead() if topic in (None, t) and group in (None, g)
    ]
    counts = await topology.counts(queues)
    found: list[DeadLetter] = []
    for queue in queues:
        if counts.get(queue):
            async with topology.browse(queue, declare=True) as browse:
                found.extend(record for _, record in records(browse.messages))
    found = [record for record in found if reason is None or record.reason == reason]
    found.sort(key=lambda record: record.dead_lettered_at)
    return found[: max(0, limit)]


async def find_dead_letter(topology: Topology, dead_letter_id: str) -> DeadLetter:
    where = parse_dead_letter_id(dead_letter_id)
    queue = None if where is None else topology.names.dead(*where)
    if queue is not None and queue in await topology.counts([queue]):
        async with topology.browse(queue, declare=True) as browse:
            for _, record in records(browse.messages):
                if record.id == dead_letter_id:
                    return record
    raise DeadLetterNotFoundError(f"no dead letter with id {dead_letter_id!r}")


async def replay_dead_letters(
    topology: Topology, partitions: int, mode: Mode, dead_letter_ids: Sequence[str]
) -> int:
    """Send records back to their groups; all ids are found before anything moves."""
    wanted = list(dict.fromkeys(dead_letter_ids))
    queues: dict[str, list[str]] = defaultdict(list)
    for dead_letter_id in wanted:
        where = parse_dead_letter_id(dead_letter_id)
        if where is None:
            raise DeadLetterNotFoundError(f"no dead letter with id {dead_letter_id!r}")
        queues[topology.names.dead(*where)].append(dead_letter_id)
    existing = await topology.counts(queues)
    async with contextlib.AsyncExitStack() as stack:
        found: dict[str, tuple[Browse, DeliveredMessage, DeadLetter]] = {}
        for queue in sorted(set(queues) & set(existing)):  # one lock order for every replay
            browse = await stack.enter_async_context(topology.browse(queue, declare=True))
            for message, record in records(browse.messages):
                if record.id in queues[queue]:
                    found[record.id] = (browse, message, record)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise DeadLetterNotFoundError(f"no dead letter with id {missing[0]!r}")
        for moved, dead_letter_id in enumerate(wanted):
            browse, message, record = found[dead_letter_id]
            try:
                await _send_back(topology, partitions, mode, record)
            except BrokerError as exc:
                raise BrokerUnavailableError(
                    f"replayed {moved} of {len(wanted)} dead letters, then: {exc}; "
                    f"the rest are still dead letters"
                ) from exc
            await browse.take(message)
    return len(wanted)


async def _send_back(topology: Topology, partitions: int, mode: Mode, record: DeadLetter) -> None:
    """The record's message, to its group's own queue only (not to the topic's other groups)."""
    kind = partition_kind(record.key, partitions)
    queue = topology.names.group_queue(record.topic, record.group, kind)
    headers = outgoing_headers(record.message, Meta(key=record.key).table())
    await topology.ensure_group(record.topic, record.group, mode)
    await topology.send("", queue, record.message.body, headers, mode)
