"""``stats()`` of the NATS backend: JetStream's consumer counts, sorted as the contract sorts.

A consumer's info says how many messages it has not delivered yet
(``num_pending``) and how many it delivered without an ack
(``num_ack_pending``). Three corrections make those the contract's counts:

* not delivered yet but published with a delay that has not passed: delayed,
  not ready (found by their ``d`` subject and ``Wirework-Not-Before`` header);
* not delivered yet but replayed to another group: not this group's at all;
* delivered and handed back with a delay (a nack or a publish delay delivered
  early): delayed, not in flight (found by their state records' ``due``).

Still approximate, and documented: a message parked behind its key, or handed
back without a delay and not taken again yet, or whose lease ran out and that
JetStream has not redelivered yet, counts as in flight (memory says ready).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from wirework.brokers.base import GroupStats
from wirework.brokers.nats_client import STREAM_NOT_FOUND, Connection, JetStreamRefusedError
from wirework.brokers.nats_state import Stores
from wirework.brokers.nats_wire import H_NOT_BEFORE, KEEPER, Names, parse_dlq_subject, parse_subject
from wirework.clock import Clock


class Stats:
    """Reads one namespace's topics and groups into ``GroupStats`` rows."""

    def __init__(self, connection: Connection, names: Names, stores: Stores, clock: Clock) -> None:
        self.connection = connection
        self.names = names
        self.stores = stores
        self.clock = clock

    async def rows(self) -> list[GroupStats]:
        dead = await self._dead_counts()
        rows: list[GroupStats] = []
        streams = await self.connection.stream_list(self.names.topics_filter)
        for info in sorted(streams, key=lambda s: str(s["config"].get("description", ""))):
            topic = str(info["config"].get("description", ""))
            stream = str(info["config"]["name"])
            state = info["state"]
            groups = [c for c in await self.connection.consumer_list(stream) if c["name"] != KEEPER]
            if not groups and int(state["messages"]) == 0:
                continue  # no group and nothing kept: a forgotten topic, as in memory
            if not groups:
                delayed = await self._delayed(stream, topic, int(state.get("first_seq") or 1))
                rows.append(
                    GroupStats(
                        topic=topic,
                        group=None,
                        ready=max(0, int(state["messages"]) - delayed),
                        delayed=delayed,
                        in_flight=0,
                        dead_lettered=0,
                    )
                )
            for consumer in sorted(groups, key=lambda c: str(c["config"].get("description"))):
                rows.append(await self._group(stream, topic, consumer, dead))
        return rows

    async def _group(
        self, stream: str, topic: str, info: dict[str, Any], dead: Counter[tuple[str, str]]
    ) -> GroupStats:
        group = str(info["config"].get("description", info["name"]))
        after = int(info["delivered"]["stream_seq"]) + 1
        not_delivered_delayed = await self._delayed(stream, topic, after)
        replays = await self.connection.scan(
            stream, self.names.kind_filter(topic, "r"), start=after
        )
        foreign = sum(1 for r in replays if parse_subject(r.subject).group != group)
        held_back = 0
        if int(info["num_ack_pending"]):
            now = self.clock.now().timestamp()
            states = await self.stores.states(topic, group)
            held_back = sum(1 for s in states if s.due is not None and s.due > now)
        return GroupStats(
            topic=topic,
            group=group,
            ready=max(0, int(info["num_pending"]) - not_delivered_delayed - foreign),
            delayed=not_delivered_delayed + held_back,
            in_flight=max(0, int(info["num_ack_pending"]) - held_back),
            dead_lettered=dead[(topic, group)],
        )

    async def _delayed(self, stream: str, topic: str, start: int) -> int:
        """Messages published with a delay, from ``start`` on, whose time has not come."""
        now = self.clock.now().timestamp()
        found = await self.connection.scan(stream, self.names.kind_filter(topic, "d"), start=start)
        return sum(1 for s in found if float(s.headers.get(H_NOT_BEFORE) or 0) > now)

    async def _dead_counts(self) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        try:
            info = await self.connection.api(
                f"STREAM.INFO.{self.names.dlq_stream}",
                {"subjects_filter": self.names.dlq_filter(None, None, None)},
                what="counting dead letters",
            )
        except JetStreamRefusedError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                return counts
            raise
        for subject, count in (info["state"].get("subjects") or {}).items():
            topic, group, _ = parse_dlq_subject(subject)
            counts[(topic, group)] += int(count)
        return counts
