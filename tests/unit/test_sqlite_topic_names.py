"""A SQLite broker checks a topic name once, not on every publish, and remembers few."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from wirework.brokers.sqlite import _TOPICS_REMEMBERED, SqliteBroker
from wirework.envelope import WireMessage
from wirework.errors import ConfigurationError

MESSAGE = WireMessage(headers={"ce-id": "m"}, body=b"{}")


async def test_remembered_names_stay_bounded_and_bad_ones_stay_refused(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "b.db") as broker:
        topics = [f"t.{n}" for n in range(_TOPICS_REMEMBERED + 10)]
        await asyncio.gather(*(broker.publish(topic, MESSAGE) for topic in topics))
        assert len(broker._topics_seen) <= _TOPICS_REMEMBERED
        for _ in range(2):  # refused each time: only valid names are remembered
            with pytest.raises(ConfigurationError, match="invalid topic name"):
                await broker.publish("bad topic!", MESSAGE)
        await broker.publish(topics[0], MESSAGE)  # forgotten or not, still accepted
