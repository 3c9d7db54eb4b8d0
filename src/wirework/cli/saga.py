"""``wirework saga``: list sagas, show one's timeline, retry a failed compensation, prune.

Reads the store the orchestrators write (``--store`` or ``WIREWORK_STORE``)
through ``wirework.saga.journal``, so it needs no saga definitions.
``retry`` only marks the saga: a running orchestrator that drives that saga
type picks it up and runs its compensations again. ``prune`` deletes the
record and history of sagas that ended long enough ago.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from wirework.cli._common import console, emit_json, fail, run
from wirework.cli._render import printable, shorten, when
from wirework.saga.journal import Pruned, SagaHistory, SagaRecord, find, load, mark_retry, prune
from wirework.saga.state import Kind, SagaStatus
from wirework.store import Store, connect_store

#: Characters of an error shown in a list row.
ERROR_CHARS = 80

#: ``--older-than`` units: seconds, minutes, hours, days, weeks.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")

app = typer.Typer(
    help="List sagas, show one's timeline, retry a failed compensation, prune old ones.",
    no_args_is_help=True,
)

StoreUrl = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="WIREWORK_STORE",
        metavar="URL",
        help="The store the orchestrators use, e.g. sqlite:///app.db.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead.")]

_STATUS_STYLE = {
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "yellow",
    SagaStatus.COMPLETED: "green",
    SagaStatus.COMPENSATED: "yellow",
    SagaStatus.COMPENSATION_FAILED: "bold red",
}
_KIND_STYLE = {
    Kind.STEP_COMPLETED: "green",
    Kind.STEP_FAILED: "red",
    Kind.COMPENSATION_STARTED: "yellow",
    Kind.COMPENSATION_COMPLETED: "yellow",
    Kind.COMPENSATION_FAILED: "bold red",
    Kind.SAGA_RETRIED: "magenta",
}


@app.command("list")
def list_sagas(
    status: Annotated[
        SagaStatus | None, typer.Option("--status", case_sensitive=False, help="Only this status.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only sagas of this type.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most rows shown.")] = 100,
    as_json: AsJson = False,
    store: StoreUrl = None,
) -> None:
    """List saga instances, newest first."""
    records = run(_list(store, status, name, limit))
    if as_json:
        emit_json([record.model_dump(mode="json") for record in records])
        return
    out = console()
    if not records:
        out.print("No sagas match.", style="dim")
        return
    out.print(sagas_table(records))


@app.command("show")
def show(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="Id from `saga list`.")],
    as_json: AsJson = False,
    store: StoreUrl = None,
) -> None:
    """Show one saga: status, input, and the timeline of every step and compensation."""
    history = run(_show(store, saga_id))
    if as_json:
        emit_json(history.model_dump(mode="json"))
        return
    console().print(timeline(history))


@app.command("retry")
def retry(
    saga_id: Annotated[str, typer.Argument(metavar="ID", help="A compensation_failed saga.")],
    publish: Annotated[
        bool,
        typer.Option(
            "--publish",
            help="Publish saga.retried on wirework.sagas through the outbox (when the "
            "orchestrators run with a broker, whose relay sends it).",
        ),
    ] = False,
    store: StoreUrl = None,
) -> None:
    """Run a compensation_failed saga's compensations again (a running orchestrator does)."""
    record = run(_retry(store, saga_id, publish))
    console().print(
        f"saga {printable(record.saga_id)} ({printable(record.name)}) is compensating again; "
        f"an orchestrator that drives {printable(record.name)!r} re-runs its compensations "
        f"(follow it with: wirework saga show {printable(record.saga_id)})"
    )
    if publish:
        console().print(
            "saga.retried is in the outbox; the store's relay publishes it", style="dim"
        )


@app.command("prune")
def prune_sagas(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Sagas that ended longer ago than this: 90s, 30m, 12h, 7d, 2w.",
        ),
    ],
    include_failed: Annotated[
        bool,
        typer.Option(
            "--include-failed",
            help="Prune compensation_failed sagas too (by default they wait for an operator).",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    as_json: AsJson = False,
    store: StoreUrl = None,
) -> None:
    """Delete the record and history of sagas that ended before a cutoff (never one in flight)."""
    age = parse_age(older_than)
    pruned, kept = run(_prune(store, age, include_failed, dry_run))
    if as_json:
        emit_json({**pruned.model_dump(mode="json"), "kept_failed": kept})
        return
    console().print(prune_summary(pruned, older_than.strip(), kept))


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` as a timedelta; a bad one ends the command."""
    match = _AGE.match(text)
    if match is None:
        fail(f"--older-than {text!r}: write a number and a unit, e.g. 7d, 12h, 30m, 90s or 2w")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


@asynccontextmanager
async def _open(url: str | None) -> AsyncIterator[Store]:
    store = connect_store(url)
    path = getattr(store, "path", None)
    if isinstance(path, Path) and not path.exists():
        # Opening would create an empty file; for a command that only looks or
        # repairs, a missing file means the wrong directory or URL.
        fail(
            f"no store file at {str(path.resolve())!r}; pass --store sqlite:///path/to/app.db "
            f"or set WIREWORK_STORE"
        )
    async with store:
        yield store


async def _list(
    url: str | None, status: SagaStatus | None, name: str | None, limit: int
) -> list[SagaRecord]:
    async with _open(url) as store:
        return await find(store, status=status, name=name, limit=limit)


async def _show(url: str | None, saga_id: str) -> SagaHistory:
    async with _open(url) as store:
        return await load(store, saga_id)


async def _retry(url: str | None, saga_id: str, publish: bool) -> SagaRecord:
    async with _open(url) as store:
        return await mark_retry(store, saga_id, publish=publish)


async def _prune(
    url: str | None, age: timedelta, include_failed: bool, dry_run: bool
) -> tuple[Pruned, int]:
    """What was (or would be) pruned, and how many compensation_failed sagas past the
    cutoff were kept for an operator."""
    async with _open(url) as store:
        pruned = await prune(store, older_than=age, include_failed=include_failed, dry_run=dry_run)
        kept = 0
        if not include_failed:
            failed = await prune(store, older_than=age, include_failed=True, dry_run=True)
            kept = failed.sagas.get(SagaStatus.COMPENSATION_FAILED, 0)
        return pruned, kept


def prune_summary(pruned: Pruned, age: str, kept: int) -> RenderableType:
    """The ``saga prune`` report: sagas by status, history events, what was kept."""
    verb = "Would delete" if pruned.dry_run else "Deleted"
    heading = Text.assemble(
        (f"{verb} {pruned.total} saga{'' if pruned.total == 1 else 's'}", "bold"),
        f" that ended before {when(pruned.cutoff)} UTC (older than {age})",
    )
    parts: list[RenderableType] = [heading]
    if pruned.total:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
        table.add_column("status", no_wrap=True)
        table.add_column("sagas", justify="right")
        for status in SagaStatus:
            if status in pruned.sagas:
                table.add_row(
                    Text(status.value, style=_STATUS_STYLE[status]), str(pruned.sagas[status])
                )
        table.add_row(Text("history events", style="dim"), str(pruned.events))
        parts.append(table)
    if kept:
        parts.append(
            Text(
                f"Kept {kept} compensation_failed saga{'' if kept == 1 else 's'} past the cutoff: "
                f"they wait for an operator (wirework saga list --status compensation_failed; "
                f"retry them, or prune them with --include-failed).",
                style="yellow",
            )
        )
    if pruned.dry_run and pruned.total:
        parts.append(Text("Dry run: nothing was deleted.", style="dim"))
    return Group(*parts)


def sagas_table(records: Sequence[SagaRecord]) -> Table:
    """The ``saga list`` table."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
    table.add_column("id", overflow="fold", min_width=12)
    table.add_column("saga", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("took", no_wrap=True, justify="right")
    table.add_column("error", overflow="fold")
    for record in records:
        table.add_row(
            Text(printable(record.saga_id)),
            Text(printable(record.name)),
            Text(record.status.value, style=_STATUS_STYLE[record.status]),
            when(record.created_at),
            _took(record.created_at, record.ended_at),
            Text(shorten(record.error or "-", ERROR_CHARS), style="red" if record.error else "dim"),
        )
    return table


def timeline(history: SagaHistory) -> RenderableType:
    """The ``saga show`` view: facts, then one line per event with its offset and details."""
    saga = history.saga
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim", no_wrap=True)
    facts.add_column(overflow="fold")
    for label, value in (
        ("id", Text(printable(saga.saga_id))),
        ("saga", Text(printable(saga.name))),
        ("status", Text(saga.status.value, style=_STATUS_STYLE[saga.status])),
        ("started", Text(when(saga.created_at, precise=True))),
        ("ended", Text(when(saga.ended_at, precise=True) if saga.ended_at else "-")),
        ("driven by", Text(printable(saga.owner or "-"))),
        ("error", Text(printable(saga.error or "-"), style="red" if saga.error else "dim")),
        ("input", Text(shorten(_json(saga.input), 400))),
        ("correlation", Text(printable(str(history.started.get("correlation_id") or "-")))),
        ("trace", Text(printable(_trace_id(history.started.get("traceparent"))))),
    ):
        facts.add_row("  " + label, value)
    events = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
    events.add_column("+s", justify="right", no_wrap=True)
    events.add_column("event", no_wrap=True)
    events.add_column("step", overflow="fold")
    events.add_column("try", justify="right", no_wrap=True)
    events.add_column("detail", overflow="fold")
    start = saga.created_at
    for event in history.events:
        events.add_row(
            f"{(event.at - start).total_seconds():.3f}",
            Text(event.kind.value, style=_KIND_STYLE.get(event.kind, "")),
            Text(printable(event.step or "")),
            "" if event.attempt is None else str(event.attempt),
            Text(_detail(event.kind, event.data), style="red" if "error" in event.data else ""),
        )
    heading = Text("Timeline", style="bold")
    return Group(Text("Saga", style="bold"), facts, Text(""), heading, events)


def _detail(kind: Kind, data: dict[str, Any]) -> str:
    parts: list[str] = []
    if "error" in data:
        kind_of = str(data.get("error_type", "")).rsplit(".", 1)[-1]
        parts.append(f"{kind_of}: {data['error']}" if kind_of else str(data["error"]))
        if data.get("unknown"):
            parts.append("(outcome unknown)")
        if "final" in data:
            parts.append("(final)" if data["final"] else "(will retry)")
    if kind is Kind.STEP_COMPLETED and data.get("output") is not None:
        parts.append(f"output {_json(data['output'])}")
    if kind is Kind.SAGA_ENDED:
        parts.append(str(data.get("status", "")))
    return shorten(" ".join(parts), 300)


def _trace_id(traceparent: Any) -> str:
    """The trace id of a recorded ``traceparent`` (``wirework trace <id>`` shows the trace)."""
    parts = str(traceparent or "").split("-")
    return parts[1] if len(parts) >= 4 else "-"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _took(started: datetime, ended: datetime | None) -> str:
    if ended is None:
        return "-"
    return f"{(ended - started).total_seconds():.2f}s"
