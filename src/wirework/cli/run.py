"""``wirework run module:svc ...``: run services until SIGTERM, with a live view or log lines.

The runtime is ``wirework.runner``; this module only turns options into a
``Runner`` or a ``Supervisor`` and picks the output: a rich ``Live`` table
when stdout is a terminal, plain log lines on stdout otherwise (a container's
log collector, a pipe, a file).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from wirework import loops
from wirework.cli._common import EXIT_USAGE, console, describe, fail, run
from wirework.errors import ConfigurationError
from wirework.listeners import Address, Listeners
from wirework.runner import (
    COUNTED,
    Runner,
    Snapshot,
    Watch,
    check_brokers,
    load_services,
)
from wirework.supervisor import Supervisor

#: Live table refreshes per second.
REFRESH_PER_SECOND = 4
#: Plain output prints a service's counts at most this often (and only on change).
SUMMARY_EVERY = 5.0

log = logging.getLogger("wirework.run")

_STATE_STYLE = {"starting": "yellow", "running": "green", "stopping": "yellow", "stopped": "dim"}


def run_command(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="MODULE:SERVICE",
            help="Services to run, as module:attribute (e.g. shop.orders:svc); the attribute "
            "may also be a function taking no arguments that returns a Service.",
            show_default=False,
        ),
    ],
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes, each running every service; one that dies is restarted. "
            "With more than 1 there is no live table (this process cannot see the workers' "
            "counters): each worker prints its own summary lines, tagged with its number.",
        ),
    ] = 1,
    grace: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds in-flight handlers get to finish on SIGTERM/Ctrl-C before they are "
            "cancelled and their messages handed back. A second signal stops at once.",
        ),
    ] = 5.0,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            metavar="URL",
            help="Broker for services created without one (sets WIREWORK_BROKER), "
            "e.g. sqlite:///wirework.db.",
            show_default=False,
        ),
    ] = None,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="HOST:PORT",
            help="Serve the services' endpoints over REST here (e.g. :8000 or 0.0.0.0:8000); "
            "OpenAPI at /openapi.json. With --workers, every worker shares the port.",
            show_default=False,
        ),
    ] = None,
    grpc: Annotated[
        str | None,
        typer.Option(
            "--grpc",
            metavar="HOST:PORT",
            help="Serve the same endpoints over gRPC here (`wirework proto` prints the .proto).",
            show_default=False,
        ),
    ] = None,
    no_live: Annotated[
        bool, typer.Option("--no-live", help="Print log lines even on a terminal.")
    ] = False,
    loop: Annotated[
        str,
        typer.Option(
            "--loop",
            metavar="|".join(loops.CHOICES),
            help="Event loop: auto is uvloop where it is installed (fewer CPU cycles a "
            "message), else asyncio's own; asyncio rules uvloop out.",
        ),
    ] = "auto",
    worker_of: Annotated[int | None, typer.Option(hidden=True)] = None,
    worker_index: Annotated[int, typer.Option(hidden=True)] = 0,
) -> None:
    """Run services until SIGTERM or Ctrl-C, then stop them gracefully.

    Exit codes: 0 after a graceful stop, 130 after a forced one (second signal),
    2 for a target or configuration to fix, 1 if a service or worker failed.
    """
    if broker is not None:
        # Workers inherit it through the environment, which keeps a password in the
        # URL out of their command lines (and so out of `ps`).
        os.environ["WIREWORK_BROKER"] = broker
    # As `python -m` does, and uvicorn: targets are found from where you run.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        event_loop = loops.resolve(loop)
        services = load_services(targets)
        check_brokers(services)
        listeners = Listeners(
            services,
            http=Address.parse(http, option="--http") if http else None,
            grpc=Address.parse(grpc, option="--grpc") if grpc else None,
            shared_port=worker_of is not None,
            grace=grace,
        )
    except ConfigurationError as exc:
        fail(describe(exc), code=EXIT_USAGE)
    out = console()
    if workers > 1 and worker_of is None:
        _log_to(out, live=False, tag="[supervisor] ")
        command = _worker_command(targets, grace, http=http, grpc=grpc, loop=event_loop)
        supervisor = Supervisor(command, workers=workers, grace=grace)
        raise typer.Exit(run(supervisor.run()))
    tag = f"[worker {worker_index} pid {os.getpid()}] " if worker_of is not None else ""
    live = out.is_terminal and not no_live and worker_of is None
    _log_to(out, live=live, tag=tag)
    runner = Runner(services, grace=grace, parent_pid=worker_of, listeners=listeners)
    if not live:
        raise typer.Exit(run(runner.serve(watch=log_summaries()), loop=event_loop))
    with Live(
        live_table(runner.snapshot()),
        console=out,
        refresh_per_second=REFRESH_PER_SECOND,
    ) as view:
        code = run(
            runner.serve(watch=lambda snapshot: view.update(live_table(snapshot))),
            loop=event_loop,
        )
    raise typer.Exit(code)


def live_table(snapshot: Snapshot) -> RenderableType:
    """The live view: one row per handler's consumer, then each service's requests."""
    handlers = _table()
    for name in ("service", "kind", "topic", "group", "handler"):
        handlers.add_column(name, overflow="fold")
    for name in ("handled", "failed", "retried", "dead-lettered", "in flight"):
        handlers.add_column(name, justify="right", no_wrap=True)
    for row in snapshot.handlers:
        handlers.add_row(
            Text(row.service),
            Text(row.kind),
            Text(row.topic),
            Text(row.group if row.group != row.topic else "", style="dim"),
            Text(row.handlers, style="dim"),
            Text(str(row.handled), style="bold"),
            _count(row.failed, "yellow"),
            _count(row.retried, "yellow"),
            _count(row.dead_lettered, "red"),
            _count(row.in_flight, "cyan"),
        )
    requests = _table()
    requests.add_column("service")
    for name in ("requests sent", "replied", "timed out", "remote errors"):
        requests.add_column(name, justify="right", no_wrap=True)
    for request in snapshot.requests:
        requests.add_row(
            Text(request.service),
            str(request.sent),
            str(request.replied),
            _count(request.timed_out, "yellow"),
            _count(request.remote_errors, "red"),
        )
    title = Text.assemble(
        ("wirework run", "bold"),
        f" · {len(snapshot.services)} service(s) · ",
        (snapshot.state, _STATE_STYLE.get(snapshot.state, "")),
    )
    if snapshot.state == "stopping":
        title.append(f" (in-flight handlers get {snapshot.grace:.1f} s; Ctrl-C again forces)")
    elif snapshot.state == "running":
        title.append(" (Ctrl-C stops gracefully)", style="dim")
    return Group(title, handlers, requests)


class SummaryLog:
    """Which summary lines plain output prints: a service's, on change, at most every ``every`` s.

    The first change prints at once (so an operator sees that work started),
    later ones wait out the interval; unchanged counts print nothing, so an
    idle service does not fill the log. Time is passed in, so this is tested
    without sleeping.
    """

    def __init__(self, every: float = SUMMARY_EVERY) -> None:
        self.every = every
        self._printed: dict[str, tuple[float, str]] = {}

    def lines(self, snapshot: Snapshot, now: float) -> list[str]:
        """The lines due at ``now``; once stopped, the runner's stop lines carry the totals."""
        if snapshot.state == "stopped":
            return []
        due: list[str] = []
        for service in snapshot.services:
            text = snapshot.summary(service)
            last_at, last_text = self._printed.get(service, (-float("inf"), _IDLE))
            if text != last_text and now - last_at >= self.every:
                self._printed[service] = (now, text)
                due.append(f"{service}: {text}")
        return due


_IDLE = " ".join(f"{name}=0" for name in COUNTED)


def log_summaries(every: float = SUMMARY_EVERY) -> Watch:
    """A ``watch`` for ``Runner.serve`` that logs ``SummaryLog`` lines (plain output)."""
    summary = SummaryLog(every)

    def watch(snapshot: Snapshot) -> None:
        for line in summary.lines(snapshot, time.monotonic()):
            log.info("%s", line)

    return watch


def _table() -> Table:
    return Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)


def _count(value: int, style: str) -> Text:
    return Text(str(value), style=style if value else "")


def _log_to(out: Console, *, live: bool, tag: str) -> None:
    """Send our log lines to stdout: above the live table, or as plain timestamped lines.

    Other libraries stay at WARNING, so a retry storm of INFO lines from the
    consumer cannot drown the start, summary and stop lines.
    """
    handler: logging.Handler
    if live:
        handler = RichHandler(console=out, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("wirework.run").setLevel(logging.INFO)


def _worker_command(
    targets: Sequence[str], grace: float, *, http: str | None, grpc: str | None, loop: str
) -> Callable[[int], list[str]]:
    """How the supervisor starts worker ``index``: this command again, as a worker.

    A fresh interpreter per worker (not a fork) imports the targets by name,
    exactly as a single-process run does, so a worker behaves like ``wirework
    run`` because it is one.
    """
    parent = str(os.getpid())
    listen = [*(["--http", http] if http else []), *(["--grpc", grpc] if grpc else [])]

    def command(index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "wirework.cli.main",
            "run",
            "--grace",
            repr(grace),
            "--loop",
            loop,
            "--no-live",
            "--worker-of",
            parent,
            "--worker-index",
            str(index),
            *listen,
            "--",
            *targets,
        ]

    return command
