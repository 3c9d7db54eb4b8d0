"""``wirework trace``: a trace from the embedded span store, drawn as a waterfall.

``wirework trace ID`` (or the first characters of the id) draws every span
of one trace under its parent, with the service, the start offset, the
duration and a bar on a shared time axis; failed spans are red.
``--last N`` lists the newest traces; ``--correlation``, ``--saga`` and
``--key`` find the traces of one flow, one saga, one business key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from wirework.cli._common import EXIT_USAGE, console, emit_json, fail
from wirework.cli._render import printable
from wirework.errors import ConfigurationError

if TYPE_CHECKING:
    from wirework.tracing.span_store import SpanRecord, SpanStore, TraceSummary

#: Where services write spans unless WIREWORK_SPAN_STORE says otherwise (the span
#: store's own default, repeated so the CLI loads without the tracing extra).
DEFAULT_STORE = Path(".wirework") / "spans.db"

#: Columns of the waterfall's time axis.
BAR_WIDTH = 40
#: Traces listed when no id or lookup is given.
DEFAULT_LAST = 20


def trace_command(
    trace_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="A trace id, or its first characters.")
    ] = None,
    last: Annotated[
        int | None, typer.Option("--last", min=1, max=1000, help="List the newest N traces.")
    ] = None,
    correlation: Annotated[
        str | None, typer.Option("--correlation", help="Traces of this correlation id.")
    ] = None,
    saga: Annotated[str | None, typer.Option("--saga", help="Traces of this saga id.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Traces of this business key.")] = None,
    store: Annotated[
        Path,
        typer.Option(
            "--store",
            envvar="WIREWORK_SPAN_STORE",
            metavar="PATH",
            help="The span store file.",
        ),
    ] = DEFAULT_STORE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Draw one trace as a waterfall, or list recent traces (default: the last 20)."""
    chosen = [
        name
        for name, value in (
            ("ID", trace_id),
            ("--last", last),
            ("--correlation", correlation),
            ("--saga", saga),
            ("--key", key),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        fail(
            f"give one of ID, --last, --correlation, --saga, --key (got {', '.join(chosen)})",
            code=EXIT_USAGE,
        )
    spans = open_span_store(store, "trace")
    try:
        if trace_id is not None:
            _show(spans, _resolve(spans, trace_id), as_json)
        elif correlation is not None or saga is not None or key is not None:
            found = spans.find(correlation_id=correlation, saga_id=saga, key=key)
            if len(found) == 1:
                _show(spans, found[0].trace_id, as_json)
            else:
                _list(found, as_json, empty="No trace matches.")
        else:
            _list(spans.recent(last or DEFAULT_LAST), as_json, empty="No traces yet.")
    except ConfigurationError as exc:
        fail(str(exc))
    finally:
        spans.close()


def open_span_store(path: Path, command: str) -> SpanStore:
    """The span store at ``path`` for ``wirework <command>``, or a clear exit saying why not."""
    try:
        # Imported here: `import wirework.cli.main` must work without the tracing extra.
        from wirework.tracing.span_store import SpanStore
    except ImportError:
        fail(f"wirework {command} needs the tracing extra: pip install 'wirework[tracing]'")
    try:
        return SpanStore(path, create=False)
    except ConfigurationError as exc:
        fail(str(exc))


def _resolve(store: SpanStore, wanted: str) -> str:
    matches = store.resolve(wanted)
    if not matches:
        fail(
            f"no trace {wanted!r} in {store.path}; list the recent ones with: "
            f"wirework trace --last {DEFAULT_LAST}"
        )
    if len(matches) > 1 and wanted.lower() not in matches:
        fail(f"{wanted!r} starts {len(matches)} trace ids ({', '.join(matches)}); give more of it")
    return wanted.lower() if wanted.lower() in matches else matches[0]


def _show(store: SpanStore, trace_id: str, as_json: bool) -> None:
    spans = store.spans(trace_id)
    if as_json:
        emit_json({"trace_id": trace_id, "spans": [s.model_dump(mode="json") for s in spans]})
        return
    out = console()
    out.print(_heading(store.summaries([trace_id])[0]))
    out.print(waterfall(spans))


def _list(summaries: Sequence[TraceSummary], as_json: bool, *, empty: str) -> None:
    if as_json:
        emit_json([s.model_dump(mode="json") | {"status": s.status} for s in summaries])
        return
    out = console()
    if not summaries:
        out.print(empty, style="dim")
        return
    out.print(traces_table(summaries))


def _heading(summary: TraceSummary) -> Text:
    text = Text()
    text.append(f"trace {summary.trace_id}", style="bold")
    text.append(
        f"  {summary.spans} spans · {', '.join(printable(s) for s in summary.services)} · "
        f"{duration_text(summary.duration)} · "
    )
    text.append(summary.status, style="bold red" if summary.errors else "green")
    return text


def duration_text(seconds: float) -> str:
    """``0.42 ms``, ``12.3 ms``, ``1.52 s``: three significant digits at most."""
    milliseconds = seconds * 1000
    if milliseconds < 10:
        return f"{milliseconds:.2f} ms"
    if milliseconds < 1000:
        return f"{milliseconds:.1f} ms"
    return f"{seconds:.2f} s"


def _ordered(spans: Sequence[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """Spans depth-first under their parents, siblings by start; orphans are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    ordered: list[tuple[int, SpanRecord]] = []
    stack = [(0, s) for s in sorted(children.get(None, []), key=_start, reverse=True)]
    while stack:
        depth, span = stack.pop()
        ordered.append((depth, span))
        below = sorted(children.get(span.span_id, []), key=_start, reverse=True)
        stack.extend((depth + 1, child) for child in below)
    return ordered


def _start(span: SpanRecord) -> int:
    return span.start_ns


def _bar(span: SpanRecord, origin: int, total: int, width: int) -> Text:
    begin = min(width - 1, int((span.start_ns - origin) / total * width)) if total else 0
    length = max(1, round((span.end_ns - span.start_ns) / total * width)) if total else width
    length = min(length, width - begin)
    bar = Text(" " * begin)
    bar.append("█" * length, style="red" if span.error else "cyan")
    return bar


def waterfall(spans: Sequence[SpanRecord], *, width: int = BAR_WIDTH) -> Table:
    """One row per span: service, name (indented under its parent), offset, duration, bar."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("service", no_wrap=True)
    table.add_column("span", no_wrap=True)
    table.add_column("start", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("timeline", no_wrap=True, min_width=width)
    if not spans:
        return table
    origin = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - origin
    for depth, span in _ordered(spans):
        style = "red" if span.error else None
        name = Text("  " * depth + printable(span.name), style=style or "")
        if span.error:
            name.append(" ✗", style="bold red")
        table.add_row(
            Text(printable(span.service), style=style or "magenta"),
            name,
            duration_text((span.start_ns - origin) / 1e9),
            duration_text(span.duration),
            _bar(span, origin, total, width),
        )
    return table


def traces_table(summaries: Sequence[TraceSummary]) -> Table:
    """The ``--last`` list: id, root span, services, spans, status, duration, start time."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("trace id", "root", "services", "spans", "status", "duration", "time (UTC)"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("spans", "duration") else "left"
        )
    for summary in summaries:
        table.add_row(
            summary.trace_id,
            printable(f"{summary.root_service}: {summary.root_name}"),
            printable(", ".join(summary.services)),
            str(summary.spans),
            Text(summary.status, style="bold red" if summary.errors else "green"),
            duration_text(summary.duration),
            summary.start.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table
