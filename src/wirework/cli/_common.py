"""What every command shares: the ``--broker`` option, consoles, and error display.

Commands run their async body through ``run``, which is the one place where a
``WireworkError`` becomes a single red line and an exit code, so no command can
leak a traceback for an error we raised on purpose. Bugs still show one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from wirework.brokers import (
    Broker,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    Inspectable,
    connect,
)
from wirework.brokers.sqlite import SqliteBroker
from wirework.cli._render import dead_letters_table, printable
from wirework.errors import (
    BrokerBusyError,
    BrokerUnavailableError,
    DeadLetterNotFoundError,
    WireworkError,
)
from wirework.loops import Loop, runner

T = TypeVar("T")

DEFAULT_BROKER = "sqlite:///wirework.db"

#: Exit codes: 1 for an error while doing the work, 2 for a command line that
#: asks for something we will not do (click uses 2 for its own usage errors).
EXIT_ERROR = 1
EXIT_USAGE = 2

#: Most dead letters one command lists or replays. The store can only list (no
#: cursor), and every record carries its body, so what a command holds is bounded.
MAX_LISTED = 10_000

#: Width used when stdout is not a terminal: tables keep one line per row at
#: their natural width instead of being squeezed into rich's default of 80.
PIPE_WIDTH = 4096

BrokerUrl = Annotated[
    str,
    typer.Option(
        "--broker",
        envvar="WIREWORK_BROKER",
        metavar="URL",
        help="Broker to inspect, e.g. sqlite:///wirework.db.",
    ),
]

Topic = Annotated[str | None, typer.Option("--topic", help="Only this topic.")]
Group = Annotated[str | None, typer.Option("--group", help="Only this consumer group.")]
Reason = Annotated[
    DeadLetterReason | None,
    typer.Option("--reason", case_sensitive=False, help="Only this dead-letter reason."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_HINTS: tuple[tuple[type[WireworkError], str], ...] = (
    (DeadLetterNotFoundError, "list the ids with: wirework dlq list"),
    (BrokerBusyError, "another process holds the broker's lock; retry in a moment"),
    (
        BrokerUnavailableError,
        "check --broker (or WIREWORK_BROKER) and that the broker is reachable",
    ),
)


def console(*, stderr: bool = False) -> Console:
    """A console that styles for a terminal and stays plain and unwrapped for a pipe.

    Markup and emoji codes are off because the text we show (error messages,
    headers, ids) comes from message producers; styles are applied explicitly.
    """
    terminal = Console(stderr=stderr).is_terminal
    return Console(
        stderr=stderr,
        markup=False,
        emoji=False,
        highlight=False,
        soft_wrap=not terminal,
        width=None if terminal else PIPE_WIDTH,
    )


def emit_json(data: Any) -> None:
    """Write ``data`` to stdout as JSON; ASCII-only, so no byte of it can drive a terminal."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def fail(message: str, *, code: int = EXIT_ERROR) -> NoReturn:
    """Print one red line on stderr and leave with ``code``."""
    console(stderr=True).print(f"error: {printable(message)}", style="bold red", soft_wrap=True)
    raise typer.Exit(code)


def describe(exc: WireworkError) -> str:
    """The error's own message plus what to do about it."""
    text = str(exc) or type(exc).__name__
    for kind, hint in _HINTS:
        if isinstance(exc, kind):
            return f"{text} ({hint})"
    if exc.retriable:
        return f"{text} (retry in a moment)"
    return text


def run(work: Coroutine[Any, Any, T], *, loop: Loop = "asyncio") -> T:
    """Run a command's async body on ``loop``, turning our errors into one line and exit 1."""
    try:
        return runner(loop)(work)
    except WireworkError as exc:
        fail(describe(exc))


@asynccontextmanager
async def open_broker(url: str) -> AsyncIterator[Broker]:
    """Open the broker ``url`` names and close it however the command ends."""
    if url.lower().startswith("memory:"):
        console(stderr=True).print(
            "note: memory:// lives inside one process, so this command sees an empty broker",
            style="yellow",
        )
    broker = connect(url)
    if isinstance(broker, SqliteBroker) and not broker.path.exists():
        # The backend would create an empty file; for a command that only looks
        # or repairs, a missing file means the wrong directory or URL.
        fail(
            f"no wirework broker file at {str(broker.path.resolve())!r}; pass "
            f"--broker sqlite:///path/to/file.db or set WIREWORK_BROKER"
        )
    async with broker:
        yield broker


def as_inspectable(broker: Broker) -> Inspectable:
    """The broker as an ``Inspectable``, or exit saying the backend cannot report topics."""
    if not isinstance(broker, Inspectable):
        _unsupported(broker, "report topics and groups", "Inspectable")
    return broker


def as_dead_letter_store(broker: Broker) -> DeadLetterStore:
    """The broker as a ``DeadLetterStore``, or exit saying it keeps no readable dead letters."""
    if not isinstance(broker, DeadLetterStore):
        _unsupported(broker, "list or replay dead letters", "DeadLetterStore")
    return broker


def _unsupported(broker: Broker, doing: str, capability: str) -> NoReturn:
    fail(
        f"the {type(broker).__name__} backend cannot {doing} (it does not implement "
        f"{capability}); point --broker at a backend that does, such as sqlite:///wirework.db"
    )


def interactive() -> bool:
    """Whether a person can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def print_dead_letters(out: Console, records: Sequence[DeadLetter]) -> None:
    """A terminal gets a table that fits its width; a pipe gets every column."""
    out.print(dead_letters_table(records, fit_width=out.width if out.is_terminal else None))
