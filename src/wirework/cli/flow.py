"""``wirework flow``: a choreographed flow from the span store, drawn as its causation tree.

``wirework flow ID`` (a correlation id, or at least 8 of its first hex
characters) draws every message of the flow under the message whose handling
published it: who published it, on which topic, each consumer that handled it
(attempts collapsed into one line, the outcome coloured, the last error), all
timed from the flow's start. ``--last N`` lists the newest flows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from wirework.cli._common import EXIT_USAGE, console, emit_json, fail
from wirework.cli._render import printable
from wirework.cli.trace import DEFAULT_STORE, duration_text, open_span_store
from wirework.errors import ConfigurationError

if TYPE_CHECKING:
    from wirework.tracing.flow import Flow, FlowSummary, Handling, Message
    from wirework.tracing.span_store import SpanStore

#: Flows listed when no id is given.
DEFAULT_LAST = 20
#: Characters of a message id shown in the tree (``--json`` has them whole).
SHORT_ID = 12

_OUTCOMES = {
    # outcome: (mark, style)
    "success": ("✓", "green"),
    "retrying": ("↻", "yellow"),
    "cancelled": ("↻", "yellow"),
    "dead_lettered": ("✗", "bold red"),
    "rejected": ("✗", "bold red"),
    "error_reply": ("✗", "bold red"),
}
_STATUS_STYLE = {"ok": "green", "pending": "yellow", "failed": "bold red"}


def flow_command(
    correlation_id: Annotated[
        str | None,
        typer.Argument(
            metavar="[CORRELATION_ID]",
            help="A correlation id, or at least 8 of its first hex characters.",
        ),
    ] = None,
    last: Annotated[
        int | None, typer.Option("--last", min=1, max=1000, help="List the newest N flows.")
    ] = None,
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
    """Draw one flow's causation tree, or list recent flows (default: the last 20)."""
    if correlation_id is not None and last is not None:
        fail("give a CORRELATION_ID or --last, not both", code=EXIT_USAGE)
    spans = open_span_store(store, "flow")
    # Imported here (the tracing extra is there: the store opened).
    from wirework.tracing.flow import load_flow, summarize_flow

    try:
        if correlation_id is not None:
            flow = load_flow(spans, _resolve(spans, correlation_id))
            if flow is None:  # pruned between the two reads
                fail(f"the flow {correlation_id!r} is no longer in {spans.path}")
            if as_json:
                emit_json(flow.model_dump(mode="json"))
            else:
                console().print(flow_tree(flow))
            return
        flows = [load_flow(spans, c) for c in spans.recent_correlations(last or DEFAULT_LAST)]
        summaries = [summarize_flow(f) for f in flows if f is not None]
        if as_json:
            emit_json([s.model_dump(mode="json") for s in summaries])
        elif summaries:
            console().print(flows_table(summaries))
        else:
            console().print("No flows yet.", style="dim")
    except ConfigurationError as exc:
        fail(str(exc))
    finally:
        spans.close()


def _resolve(store: SpanStore, wanted: str) -> str:
    matches = store.resolve_correlation(wanted)
    if not matches:
        fail(
            f"no flow with correlation id {wanted!r} in {store.path} (a prefix needs "
            f"at least 8 hex characters); list the recent ones with: "
            f"wirework flow --last {DEFAULT_LAST}"
        )
    if len(matches) > 1:
        fail(
            f"{wanted!r} starts {len(matches)} correlation ids ({', '.join(matches)}); "
            f"give more of it"
        )
    return matches[0]


def flow_tree(flow: Flow) -> Tree:
    """The flow as a rich tree: its heading, then every message under its cause."""
    tree = Tree(_heading(flow), guide_style="dim")
    for message in flow.roots:
        parent = tree
        if message.trigger is not None:
            trigger = message.trigger
            label = Text("▶ ", style="cyan")
            label.append(printable(f"{trigger.service}: {trigger.name}"), style="bold")
            label.append(f" ({trigger.kind.lower()})", style="dim")
            label.append(f"  +{duration_text(trigger.start)} · {duration_text(trigger.duration)}")
            if trigger.error is not None:
                label.append(f"\n{printable(trigger.error)}", style="red")
            parent = tree.add(label)
        _add_message(parent, message)
    for message in flow.orphans:
        _add_message(tree, message)
    return tree


def _heading(flow: Flow) -> Text:
    text = Text()
    text.append(f"flow {printable(flow.correlation_id)}", style="bold")
    count = f"{flow.messages} message{'s' if flow.messages != 1 else ''}"
    text.append(
        f"  {count} · {', '.join(printable(s) for s in flow.services)} · "
        f"{duration_text(flow.duration)} · "
    )
    text.append(flow.status, style=_STATUS_STYLE.get(flow.status, ""))
    return text


def _add_message(parent: Tree, message: Message) -> None:
    label = Text()
    if message.reply:
        label.append("↩ reply ", style="cyan")
    elif message.request:
        label.append("✉ request ", style="cyan")
    else:
        label.append("✉ ", style="cyan")
    label.append(printable(message.type or "(type not recorded)"), style="bold")
    if message.topic is not None:
        label.append(f" on {printable(message.topic)}")
    if message.publisher is not None and message.published is not None:
        label.append(f" from {printable(message.publisher)}", style="magenta")
        if message.via is not None:
            label.append(f" ({printable(message.via)})", style="magenta")
        label.append(f"  +{duration_text(message.published)}")
    else:
        label.append("  (publish not recorded)", style="dim")
    label.append(f"  id {printable(message.id[:SHORT_ID])}", style="dim")
    if not message.cause_recorded:
        cause = printable((message.causation_id or "?")[:SHORT_ID])
        label.append(f"  cause not recorded (id {cause})", style="yellow")
    if message.publish_error is not None:
        label.append(f"\npublish failed: {printable(message.publish_error)}", style="red")
    node = parent.add(label)
    if not message.handlings and not message.reply:
        node.add(Text("no consumer recorded", style="dim"))
    for handling in message.handlings:
        below = node.add(_handling_label(handling))
        for child in handling.children:
            _add_message(below, child)
    for child in message.children:
        _add_message(node, child)


def _handling_label(handling: Handling) -> Text:
    mark, style = _OUTCOMES.get(handling.outcome, ("?", "yellow"))
    label = Text(f"{mark} ", style=style)
    label.append(printable(handling.service), style="magenta")
    if handling.handler is not None:
        # A handler defined in a function is named `outer.<locals>.handle`: the end is enough.
        label.append(f" · {printable(handling.handler.rsplit('<locals>.', 1)[-1])}")
    if handling.group is not None:
        label.append(f" [{printable(handling.group)}]", style="dim")
    label.append("  ")
    label.append(_outcome_text(handling), style=style)
    label.append(f"  +{duration_text(handling.start)} · {duration_text(handling.duration)}")
    if handling.error is not None and handling.outcome == "success":
        label.append(f"\nearlier attempt failed: {printable(handling.error)}", style="dim")
    elif handling.error is not None:
        label.append(f"\n{printable(handling.error)}", style="red")
    return label


def _outcome_text(handling: Handling) -> str:
    after = f" after {handling.attempts} attempts" if handling.attempts > 1 else ""
    return {
        "success": f"ok{after}",
        "dead_lettered": f"dead-lettered{after}",
        "rejected": "rejected, dead-lettered",
        "error_reply": "answered with an error",
        "retrying": f"attempt {handling.attempts} failed, retry due",
        "cancelled": "cancelled, to be redelivered",
    }.get(handling.outcome, handling.outcome)


def flows_table(summaries: list[FlowSummary]) -> Table:
    """The ``--last`` list: correlation id, root, messages, status, duration, start time."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("correlation id", "root", "messages", "status", "duration", "time (UTC)"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("messages", "duration") else "left"
        )
    for summary in summaries:
        table.add_row(
            printable(summary.correlation_id),
            printable(summary.root),
            str(summary.messages),
            Text(summary.status, style=_STATUS_STYLE.get(summary.status, "")),
            duration_text(summary.duration),
            summary.start.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table
