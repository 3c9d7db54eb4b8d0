"""Turning broker records into tables, previews and JSON, with no I/O of their own.

Everything shown here may come from a message producer (error texts, header
values, bodies), so text goes through ``printable`` before it reaches the
terminal: an escape sequence in an error message must show as ``\\x1b``, not
clear the operator's screen. Bodies are capped so a megabyte of binary never
floods a terminal; ``dlq show --json`` carries the whole body for scripts.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from rich import box
from rich.console import Group, RenderableType
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

from wirework.brokers import DeadLetter, GroupStats

#: Characters of a text or JSON body shown by ``dlq show``.
PREVIEW_CHARS = 4000
#: Bytes of a binary body shown as a hex dump by ``dlq show``.
HEX_PREVIEW_BYTES = 256
#: Characters of ``error type: message`` in a ``dlq list`` row.
TABLE_ERROR_CHARS = 80
#: Characters of a message id or header value before it is cut.
FIELD_CHARS = 200
#: Narrowest a name column gets on a narrow terminal (it folds beyond that).
NAME_MIN_WIDTH = 10
#: Dead-letter ids up to this long are never folded, so they copy in one piece.
ID_MIN_WIDTH = 40
#: Share of unprintable characters above which UTF-8 text is shown as hex.
BINARY_RATIO = 0.1

_KEEP_IN_BLOCKS = frozenset("\n\t")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every character that could move the cursor or reorder text escaped.

    Control characters, bidi overrides and other invisible characters become
    Python-style escapes (``\\x1b``, ``\\u202e``), so what the terminal shows
    is what the message holds.
    """
    if text.isprintable():
        return text
    keep = _KEEP_IN_BLOCKS if keep_newlines else frozenset()
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shorten(text: str, limit: int) -> str:
    """One printable line of at most ``limit`` characters, ``…`` marking a cut."""
    line = printable(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def when(moment: datetime, *, precise: bool = False) -> str:
    """A timestamp in UTC; naive datetimes are taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    if precise:
        return moment.isoformat().replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def stats_table(stats: Iterable[GroupStats]) -> Table:
    """The ``wirework topics`` table, one row per (topic, group)."""
    rows = sorted(stats, key=lambda s: (s.topic, s.group or ""))
    topics = [Text(row.topic) for row in rows]
    groups = [
        Text(row.group) if row.group is not None else Text("(no groups)", style="dim")
        for row in rows
    ]
    table = _new_table()
    _add_name_column(table, "topic", topics)
    _add_name_column(table, "group", groups)
    for name in ("ready", "delayed", "in flight", "dead-lettered", "backlog"):
        table.add_column(name, justify="right", no_wrap=True)
    for row, topic, group in zip(rows, topics, groups, strict=True):
        table.add_row(
            topic,
            group,
            str(row.ready),
            str(row.delayed),
            str(row.in_flight),
            Text(str(row.dead_lettered), style="red" if row.dead_lettered else ""),
            Text(str(row.backlog), style="bold"),
        )
    return table


def _new_table() -> Table:
    return Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)


def _add_name_column(
    table: Table, header: str, cells: Sequence[Text], *, keep: int = NAME_MIN_WIDTH
) -> None:
    """A column of names or ids: folded over lines on a narrow terminal, never cut.

    A cut id cannot be copied into the next command. ``min_width`` (capped at
    the content's own width, so short columns stay short) keeps the first
    ``keep`` characters on one line however narrow the terminal is.
    """
    natural = max((cell.cell_len for cell in cells), default=0)
    table.add_column(header, overflow="fold", min_width=min(keep, max(natural, len(header))))


def stats_json(stats: Iterable[GroupStats]) -> list[dict[str, Any]]:
    """The ``wirework topics --json`` document: the stats fields plus ``backlog``."""
    rows = sorted(stats, key=lambda s: (s.topic, s.group or ""))
    return [{**row.model_dump(mode="json"), "backlog": row.backlog} for row in rows]


@dataclass(frozen=True, slots=True)
class _Column:
    header: str
    cell: Callable[[DeadLetter], Text]
    kind: Literal["name", "fixed", "text"] = "name"
    """name: folds, never cut; fixed: one line (times, counts); text: the error, wraps."""
    keep: int = NAME_MIN_WIDTH
    """Characters kept on one line however narrow the terminal (name and text kinds)."""


_DEAD_LETTER_COLUMNS = (
    _Column("id", lambda r: Text(printable(r.id)), keep=ID_MIN_WIDTH),
    _Column("topic", lambda r: Text(r.topic)),
    _Column("group", lambda r: Text(r.group)),
    _Column("message id", lambda r: Text(shorten(r.message_id or "-", FIELD_CHARS))),
    _Column("reason", lambda r: Text(r.reason.value), kind="fixed"),
    _Column("attempts", lambda r: Text(str(r.attempts), justify="right"), kind="fixed"),
    _Column("first failure (UTC)", lambda r: Text(when(r.first_failure_at)), kind="fixed"),
    _Column("last failure (UTC)", lambda r: Text(when(r.last_failure_at)), kind="fixed"),
    _Column(
        "error",
        lambda r: Text(_error_summary(r), style="red" if r.error else "dim"),
        kind="text",
    ),
)
#: Columns left out, in this order, while a ``dlq list`` table is too wide for the terminal.
_DROPPABLE = ("first failure (UTC)", "message id", "attempts", "last failure (UTC)")
#: Room the error column needs, at least, beside the others before it wraps.
_ERROR_MIN_WIDTH = 40


def dead_letters_table(records: Sequence[DeadLetter], *, fit_width: int | None = None) -> Table:
    """The ``wirework dlq list`` table.

    With ``fit_width`` (a terminal's width), the least useful columns are left
    out until the rest fits: rich would otherwise squeeze every column into a
    few characters and fold ids over many lines.
    """
    cells = {c.header: [c.cell(record) for record in records] for c in _DEAD_LETTER_COLUMNS}
    shown = list(_DEAD_LETTER_COLUMNS)
    for header in _DROPPABLE:
        beside_error = [c for c in shown if c.kind != "text"]
        if fit_width is None or _width(beside_error, cells) + _ERROR_MIN_WIDTH <= fit_width:
            break
        shown = [c for c in shown if c.header != header]
    table = _new_table()
    for column in shown:
        if column.kind == "fixed":
            table.add_column(column.header, no_wrap=True)
        else:
            _add_name_column(table, column.header, cells[column.header], keep=column.keep)
    for row in zip(*(cells[c.header] for c in shown), strict=True):
        table.add_row(*row)
    return table


def _width(columns: Sequence[_Column], cells: dict[str, list[Text]]) -> int:
    """Width of these columns at their natural size: one space of padding each side, and
    one separator between columns (``_new_table``'s box without edges)."""
    natural = [max([len(c.header)] + [t.cell_len for t in cells[c.header]]) for c in columns]
    return sum(width + 2 for width in natural) + len(columns) - 1


def replay_summary_table(records: Sequence[DeadLetter]) -> Table:
    """Dead letters per topic and group, shown above the replay confirmation prompt."""
    counts = Counter((r.topic, r.group) for r in records)
    pairs = sorted(counts)
    topics = [Text(topic) for topic, _ in pairs]
    groups = [Text(group) for _, group in pairs]
    table = _new_table()
    _add_name_column(table, "topic", topics)
    _add_name_column(table, "group", groups)
    table.add_column("dead letters", justify="right", no_wrap=True)
    for pair, topic, group in zip(pairs, topics, groups, strict=True):
        table.add_row(topic, group, f"{counts[pair]:,}")
    return table


def _error_summary(record: DeadLetter) -> str:
    if record.error is None:
        return "-"
    short_type = record.error.error_type.rsplit(".", 1)[-1]
    return shorten(f"{short_type}: {record.error.message}", TABLE_ERROR_CHARS)


def dead_letter_json(record: DeadLetter, *, with_message: bool) -> dict[str, Any]:
    """A dead letter as JSON; ``with_message`` adds the headers and the whole body.

    The body travels as base64 (lossless for any bytes) and, when it is UTF-8,
    also as text, so ``jq -r .body_text | jq`` works for JSON bodies.
    """
    data: dict[str, Any] = record.model_dump(mode="json", exclude={"message"})
    data["message_size"] = record.message.size
    if with_message:
        body = record.message.body
        data["headers"] = dict(record.message.headers)
        data["body_base64"] = base64.b64encode(body).decode("ascii")
        try:
            data["body_text"] = body.decode("utf-8")
        except UnicodeDecodeError:
            data["body_text"] = None
    return data


def dead_letter_detail(record: DeadLetter) -> RenderableType:
    """Everything ``dlq show`` knows about one dead letter, body preview last."""
    facts = _facts(
        ("id", printable(record.id)),
        ("topic", record.topic),
        ("group", record.group),
        ("message id", printable(record.message_id or "-")),
        ("key", printable(record.key or "-")),
        ("reason", record.reason.value),
        ("attempts", str(record.attempts)),
        ("first failure", when(record.first_failure_at, precise=True)),
        ("last failure", when(record.last_failure_at, precise=True)),
        ("dead-lettered", when(record.dead_lettered_at, precise=True)),
    )
    parts: list[RenderableType] = [Text("Dead letter", style="bold"), facts, Text("")]
    parts.append(Text("Error", style="bold"))
    if record.error is None:
        parts.append(Text("  none recorded", style="dim"))
    else:
        parts.append(
            _facts(
                ("type", printable(record.error.error_type)),
                ("message", printable(record.error.message, keep_newlines=True)),
                ("field", printable(record.error.field or "-")),
            )
        )
    headers = record.message.headers
    parts += [Text(""), Text(f"Headers ({len(headers)})", style="bold")]
    if headers:
        parts.append(
            _facts(
                *((shorten(k, FIELD_CHARS), shorten(v, FIELD_CHARS)) for k, v in headers.items())
            )
        )
    body = record.message.body
    parts += [Text(""), Text(f"Body ({len(body)} bytes)", style="bold"), body_preview(body)]
    return Group(*parts)


def _facts(*pairs: tuple[str, str]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in pairs:
        grid.add_row("  " + name, Text(value))
    return grid


def body_preview(body: bytes) -> RenderableType:
    """Pretty JSON, escaped text, or a hex dump of the first bytes, always capped."""
    if not body:
        return Text("  (empty)", style="dim")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return hex_dump(body)
    try:
        pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pretty = None
    if pretty is not None:
        shown = _cap(printable(pretty, keep_newlines=True))
        return JSONHighlighter()(shown)
    unprintable = sum(1 for c in text if not c.isprintable() and c not in _KEEP_IN_BLOCKS)
    if unprintable > BINARY_RATIO * len(text):
        return hex_dump(body)
    return Text(_cap(printable(text, keep_newlines=True)))


def _cap(text: str) -> str:
    if len(text) <= PREVIEW_CHARS:
        return text
    rest = len(text) - PREVIEW_CHARS
    return (
        f"{text[:PREVIEW_CHARS]}\n… {rest} more characters not shown "
        f"(dlq show ID --json has the whole body)"
    )


def hex_dump(body: bytes) -> Text:
    """``xxd``-style lines for the first ``HEX_PREVIEW_BYTES`` bytes of ``body``."""
    lines = []
    shown = body[:HEX_PREVIEW_BYTES]
    for offset in range(0, len(shown), 16):
        chunk = shown[offset : offset + 16]
        hex_part = " ".join(f"{b:02x}" for b in chunk)
        ascii_part = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:08x}  {hex_part:<47}  |{ascii_part}|")
    if len(body) > len(shown):
        lines.append(
            f"… {len(body) - len(shown)} more bytes not shown "
            f"(dlq show ID --json has the whole body)"
        )
    return Text("\n".join(lines))
