"""``wirework dlq``: list, read and replay dead letters through ``DeadLetterStore``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from wirework.brokers import DeadLetter, DeadLetterReason
from wirework.cli._common import (
    DEFAULT_BROKER,
    MAX_LISTED,
    AsJson,
    BrokerUrl,
    Group,
    Reason,
    Topic,
    as_dead_letter_store,
    console,
    emit_json,
    open_broker,
    print_dead_letters,
    run,
)
from wirework.cli._render import dead_letter_detail, dead_letter_json
from wirework.cli.replay import replay

app = typer.Typer(help="List, show and replay dead-lettered messages.", no_args_is_help=True)


@app.command("list")
def list_dead_letters(
    topic: Topic = None,
    group: Group = None,
    reason: Reason = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LISTED, help="Most rows shown.")] = 100,
    as_json: AsJson = False,
    broker: BrokerUrl = DEFAULT_BROKER,
) -> None:
    """List dead letters, oldest first."""
    records = run(_list(broker, topic, group, reason, limit))
    if as_json:
        emit_json([dead_letter_json(r, with_message=False) for r in records])
        return
    out = console()
    if not records:
        out.print("No dead letters match.", style="dim")
        return
    print_dead_letters(out, records)
    if len(records) >= limit:
        console(stderr=True).print(
            f"note: showing the oldest {limit}; pass a larger --limit for more", style="yellow"
        )


@app.command("show")
def show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID", help="Id from `dlq list`.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON with headers and the whole body.")
    ] = False,
    broker: BrokerUrl = DEFAULT_BROKER,
) -> None:
    """Show one dead letter: error, times, headers and a preview of the body."""
    record = run(_show(broker, dead_letter_id))
    if as_json:
        emit_json(dead_letter_json(record, with_message=True))
    else:
        console().print(dead_letter_detail(record))


app.command("replay")(replay)


async def _list(
    url: str,
    topic: str | None,
    group: str | None,
    reason: DeadLetterReason | None,
    limit: int,
) -> Sequence[DeadLetter]:
    async with open_broker(url) as broker:
        store = as_dead_letter_store(broker)
        return await store.dead_letters(topic=topic, group=group, reason=reason, limit=limit)


async def _show(url: str, dead_letter_id: str) -> DeadLetter:
    async with open_broker(url) as broker:
        return await as_dead_letter_store(broker).dead_letter(dead_letter_id)
