"""``wirework topics``: how much work is waiting where, from ``Inspectable.stats()``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from wirework.brokers import GroupStats
from wirework.cli._common import (
    DEFAULT_BROKER,
    BrokerUrl,
    as_inspectable,
    console,
    emit_json,
    open_broker,
    run,
)
from wirework.cli._render import stats_json, stats_table


def topics(
    broker: BrokerUrl = DEFAULT_BROKER,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every topic and group with ready, delayed, in-flight and dead-lettered counts."""
    stats = run(_stats(broker))
    if as_json:
        emit_json(stats_json(stats))
        return
    out = console()
    if not stats:
        out.print("No topics yet.", style="dim")
        return
    out.print(stats_table(stats))


async def _stats(url: str) -> Sequence[GroupStats]:
    async with open_broker(url) as broker:
        return await as_inspectable(broker).stats()
