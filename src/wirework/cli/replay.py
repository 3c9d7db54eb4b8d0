"""``wirework dlq replay``: hand dead letters back to the groups that failed them.

Replay is the one command that changes the broker, so it is careful: filters
alone select nothing without ``--all-matching``, ``--dry-run`` shows the
selection, a person confirms it (a script must say ``--yes``), and ids are
resolved before anything moves, so a typo in one id replays none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wirework.brokers import DeadLetter, DeadLetterReason, DeadLetterStore
from wirework.cli._common import (
    DEFAULT_BROKER,
    EXIT_ERROR,
    EXIT_USAGE,
    MAX_LISTED,
    BrokerUrl,
    Group,
    Reason,
    Topic,
    as_dead_letter_store,
    console,
    describe,
    fail,
    interactive,
    open_broker,
    print_dead_letters,
    run,
)
from wirework.cli._render import replay_summary_table
from wirework.errors import DeadLetterNotFoundError, WireworkError

#: Ids handed to one ``DeadLetterStore.replay`` call.
REPLAY_BATCH = 100


def replay(
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="Dead-letter ids to replay.", show_default=False),
    ] = None,
    topic: Topic = None,
    group: Group = None,
    reason: Reason = None,
    all_matching: Annotated[
        bool, typer.Option("--all-matching", help="Replay every dead letter the filters match.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be replayed; move nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    broker: BrokerUrl = DEFAULT_BROKER,
) -> None:
    """Hand dead letters back to the group that failed them, attempt count reset."""
    chosen = list(dict.fromkeys(ids or []))
    filtered = topic is not None or group is not None or reason is not None
    _check_selection(chosen, filtered=filtered, all_matching=all_matching)
    if not (dry_run or yes or interactive()):
        fail(
            "refusing to replay without confirmation because stdin is not a terminal; "
            "pass --yes to replay, or --dry-run to see what would move",
            code=EXIT_USAGE,
        )
    records, capped = run(_select(broker, chosen, topic, group, reason))
    out, err = console(), console(stderr=True)
    if capped:
        err.print(
            f"note: taking the oldest {MAX_LISTED} matches; run the command again for the rest",
            style="yellow",
        )
    if not records:
        out.print("No dead letters match; nothing to replay.", style="dim")
        return
    if dry_run:
        print_dead_letters(out, records)
        out.print(f"Dry run: would replay {_count(len(records))}; nothing was moved.")
        return
    if not yes:
        err.print(replay_summary_table(records))
        if not typer.confirm(
            f"Replay {_count(len(records))} to the groups that failed them?", err=True
        ):
            err.print("Nothing was replayed.")
            raise typer.Exit(EXIT_ERROR)
    outcome = run(_replay(broker, [r.id for r in records], err))
    out.print(f"Replayed {_count(outcome.moved)}.")
    if outcome.gone:
        err.print(
            f"note: {_count(outcome.gone)} had gone meanwhile (replayed or removed elsewhere)",
            style="yellow",
        )


def _check_selection(ids: Sequence[str], *, filtered: bool, all_matching: bool) -> None:
    """Refuse selections that are ambiguous or that would replay more than was meant."""
    if ids and (filtered or all_matching):
        fail(
            "pass either dead-letter ids or filters with --all-matching, not both",
            code=EXIT_USAGE,
        )
    if not ids and not all_matching:
        if filtered:
            fail(
                "filters alone replay nothing: add --all-matching to replay every dead letter "
                "they match (try --dry-run first)",
                code=EXIT_USAGE,
            )
        fail(
            "name the dead letters to replay (ids from `wirework dlq list`), "
            "or pass --all-matching with --topic/--group/--reason",
            code=EXIT_USAGE,
        )


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """How a replay went: ``gone`` counts ids that vanished between listing and moving."""

    moved: int
    gone: int


async def replay_all(
    store: DeadLetterStore, ids: Sequence[str], *, progress_console: Console
) -> ReplayOutcome:
    """Replay ``ids`` in batches of ``REPLAY_BATCH``, with a progress bar when there are many.

    ``replay`` moves none of a batch if one id is unknown; an id that vanished
    after we listed it (another operator replayed it) must not stop the rest,
    so such a batch is retried one id at a time and the vanished ones counted.

    Raises:
        WireworkError: a batch failed for another reason; earlier batches stay moved.
    """
    moved = gone = 0
    progress = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=progress_console,
        transient=True,
        disable=len(ids) <= REPLAY_BATCH or not progress_console.is_terminal,
    )
    with progress:
        task = progress.add_task("replay", total=len(ids))
        for start in range(0, len(ids), REPLAY_BATCH):
            batch = ids[start : start + REPLAY_BATCH]
            try:
                moved += await store.replay(batch)
            except DeadLetterNotFoundError:
                for one in batch:
                    try:
                        moved += await store.replay([one])
                    except DeadLetterNotFoundError:
                        gone += 1
            progress.advance(task, len(batch))
    return ReplayOutcome(moved=moved, gone=gone)


async def _select(
    url: str,
    ids: Sequence[str],
    topic: str | None,
    group: str | None,
    reason: DeadLetterReason | None,
) -> tuple[Sequence[DeadLetter], bool]:
    """The records to replay, and whether the ``MAX_LISTED`` cut the selection short."""
    async with open_broker(url) as broker:
        store = as_dead_letter_store(broker)
        if not ids:
            found = await store.dead_letters(
                topic=topic, group=group, reason=reason, limit=MAX_LISTED
            )
            return found, len(found) >= MAX_LISTED
        records: list[DeadLetter] = []
        missing: list[str] = []
        for dead_letter_id in ids:
            try:
                records.append(await store.dead_letter(dead_letter_id))
            except DeadLetterNotFoundError:
                missing.append(dead_letter_id)
    if missing:
        others = f" nor {len(missing) - 1} other id(s)" if len(missing) > 1 else ""
        fail(
            f"no dead letter has id {missing[0]!r}{others}; nothing was replayed "
            f"(list the ids with: wirework dlq list)"
        )
    return records, False


async def _replay(url: str, ids: Sequence[str], err: Console) -> ReplayOutcome:
    async with open_broker(url) as broker:
        store = as_dead_letter_store(broker)
        try:
            return await replay_all(store, ids, progress_console=err)
        except WireworkError as exc:
            fail(
                f"{describe(exc)}; dead letters replayed before it stay replayed, "
                f"run the command again for the rest"
            )


def _count(n: int) -> str:
    return "1 dead letter" if n == 1 else f"{n:,} dead letters"
