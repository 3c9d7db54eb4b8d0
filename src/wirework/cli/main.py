"""The ``wirework`` command line (``pyproject.toml`` points its script entry at ``main``)."""

from __future__ import annotations

import typer

from wirework.cli.dlq import app as dlq_app
from wirework.cli.flow import flow_command
from wirework.cli.proto import proto_command
from wirework.cli.run import run_command
from wirework.cli.saga import app as saga_app
from wirework.cli.topics import topics
from wirework.cli.trace import trace_command

app = typer.Typer(
    name="wirework",
    help="Run wirework services; inspect a broker's topics, backlogs and dead letters.",
    no_args_is_help=True,
    # Locals would put message bodies and broker URLs with passwords on the screen.
    pretty_exceptions_show_locals=False,
)
app.command("run")(run_command)
app.command("topics")(topics)
app.command("proto")(proto_command)
app.command("trace")(trace_command)
app.command("flow")(flow_command)
app.add_typer(dlq_app, name="dlq")
app.add_typer(saga_app, name="saga")


def main() -> None:
    """Run the command line; exits with 0, 1 (error) or 2 (usage)."""
    app()


if __name__ == "__main__":
    main()
