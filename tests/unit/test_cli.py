"""The ``wirework`` command, run in-process against a real SQLite broker file.

Rendering helpers are checked on hand-made records; every command is checked
end to end through typer's ``CliRunner`` on a ``sqlite:///`` file filled by the
real broker, and the confirmation prompt through a real pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from rich.console import Console, RenderableType
from typer.testing import CliRunner, Result

from wirework.brokers import (
    Broker,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    Failure,
    Subscription,
    connect,
)
from wirework.cli._common import as_dead_letter_store, as_inspectable, describe
from wirework.cli._render import (
    HEX_PREVIEW_BYTES,
    PREVIEW_CHARS,
    body_preview,
    dead_letter_detail,
    dead_letters_table,
    printable,
)
from wirework.cli.main import app
from wirework.cli.replay import replay_all
from wirework.envelope import Envelope, WireMessage, encode_binary
from wirework.errors import BrokerBusyError, ConfigurationError, DeadLetterNotFoundError

# Colour and width must come from the output stream alone, whatever the developer's shell sets.
CLEAN_ENV: Mapping[str, str | None] = {
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "NO_COLOR": None,
    "COLUMNS": None,
    "WIREWORK_BROKER": None,
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WHEN = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def url(tmp_path: Path) -> str:
    # durability=fast: these tests are about the CLI, not fsync, and seed hundreds of rows.
    return f"sqlite:///{tmp_path / 'broker.db'}?durability=fast"


def cli(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner(env={**CLEAN_ENV, **(env or {})}).invoke(app, list(args))


async def _seed(
    url: str,
    topic: str,
    group: str,
    count: int,
    *,
    reason: DeadLetterReason = DeadLetterReason.REJECTED,
    error: Failure | None = None,
    message: WireMessage | None = None,
) -> list[str]:
    async with connect(url) as broker, asyncio.timeout(30):
        for _ in range(count):
            await broker.publish(
                topic, message or encode_binary(Envelope.new("test.failed", source="tests"))
            )
        deliveries = broker.subscribe(Subscription(topic=topic, group=group, prefetch=1))
        for _ in range(count):
            delivery = await anext(deliveries)
            await delivery.dead_letter(reason, error or Failure(error_type="X", message="boom"))
        store = as_dead_letter_store(broker)
        return [r.id for r in await store.dead_letters(topic=topic, group=group, limit=10_000)]


def seed(
    url: str,
    topic: str,
    group: str,
    count: int = 1,
    *,
    reason: DeadLetterReason = DeadLetterReason.REJECTED,
    error: Failure | None = None,
    message: WireMessage | None = None,
) -> list[str]:
    """Dead-letter ``count`` fresh messages of ``topic`` in ``group``; all its dead-letter ids."""
    return asyncio.run(_seed(url, topic, group, count, reason=reason, error=error, message=message))


def dead_letter_ids(url: str, **filters: str) -> list[str]:
    result = cli("dlq", "list", "--json", "--limit", "10000", "--broker", url, *_flags(filters))
    assert result.exit_code == 0, result.output
    return [row["id"] for row in json.loads(result.stdout)]


def _flags(filters: Mapping[str, str]) -> list[str]:
    return [part for name, value in filters.items() for part in (f"--{name}", value)]


async def _next_delivery(url: str, topic: str, group: str) -> WireMessage:
    async with connect(url) as broker, asyncio.timeout(10):
        delivery: Delivery = await anext(broker.subscribe(Subscription(topic=topic, group=group)))
        await delivery.ack()
        return delivery.message


def render(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=200, markup=False, emoji=False, highlight=False).print(renderable)
    return out.getvalue()


def record(
    *, body: bytes = b"{}", error: Failure | None = None, message_id: str = "m1"
) -> DeadLetter:
    return DeadLetter(
        id="dl-1",
        topic="orders",
        group="billing",
        message_id=message_id,
        reason=DeadLetterReason.REJECTED,
        attempts=3,
        first_failure_at=WHEN,
        last_failure_at=WHEN,
        dead_lettered_at=WHEN,
        error=error,
        message=WireMessage(headers={"ce-id": message_id}, body=body),
    )


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# -- rendering, on hand-made records -------------------------------------------------


def test_printable_escapes_characters_that_drive_or_reorder_a_terminal() -> None:
    assert printable("plain text, accents é") == "plain text, accents é"
    assert printable("a\x1b[2Jb\u202ec\nd") == "a\\x1b[2Jb\\u202ec\\x0ad"
    assert printable("line one\nline two", keep_newlines=True) == "line one\nline two"


def test_dead_letter_table_shows_producer_text_literally_never_as_markup_or_escapes() -> None:
    hostile = Failure(error_type="app.Boom", message="[bold red]boom[/] :smile: \x1b[2J\nnext")
    shown = render(dead_letters_table([record(error=hostile, message_id="[link=x]id[/link]")]))
    assert "\x1b" not in shown
    assert "Boom: [bold red]boom[/] :smile: \\x1b[2J\\x0anext" in shown
    assert "[link=x]id[/link]" in shown


def test_dead_letter_table_leaves_out_columns_to_fit_a_narrow_terminal() -> None:
    long_id = "01J9ZK3V6Q4W8E2R7T5Y1U0I9O"
    records = [
        record(error=Failure(error_type="E", message="x " * 60)).model_copy(update={"id": long_id})
    ]
    out = io.StringIO()
    Console(file=out, width=80, markup=False).print(dead_letters_table(records, fit_width=80))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "first failure" not in lines[0]
    assert long_id in out.getvalue()


def test_error_descriptions_say_what_to_do() -> None:
    assert "retry" in describe(BrokerBusyError("the broker file is locked"))
    assert "wirework dlq list" in describe(DeadLetterNotFoundError("no dead letter 7"))
    assert describe(ConfigurationError("write sqlite:///x.db")) == "write sqlite:///x.db"


def test_json_body_preview_is_pretty_printed() -> None:
    shown = render(body_preview(b'{"order": 7, "items": ["a"]}'))
    assert '"order": 7,' in shown.splitlines()[1]


def test_binary_body_preview_is_a_capped_hex_dump() -> None:
    body = bytes(range(256)) * 40
    lines = render(body_preview(body)).splitlines()
    assert lines[0].startswith("00000000  00 01 02")
    assert len(lines) == HEX_PREVIEW_BYTES // 16 + 1
    assert f"{len(body) - HEX_PREVIEW_BYTES} more bytes not shown" in lines[-1]


def test_utf8_body_made_of_control_characters_is_shown_as_hex() -> None:
    assert render(body_preview(b"\x00" * 64)).startswith("00000000  00 00")


def test_long_text_body_preview_is_capped() -> None:
    shown = render(body_preview(b"a" * 100_000))
    assert len(shown) < PREVIEW_CHARS + 200
    assert "more characters not shown" in shown


def test_detail_view_shows_headers_error_times_and_body() -> None:
    shown = render(
        dead_letter_detail(record(body=b'{"a": 1}', error=Failure(error_type="E", message="bad")))
    )
    for expected in ("ce-id", "m1", "rejected", "2026-01-01T12:00:00Z", "bad", '"a": 1'):
        assert expected in shown


class _PublishOnly(Broker):
    """A backend with none of the optional capabilities, to check the message about them."""

    async def publish(
        self, topic: str, message: WireMessage, *, key: str | None = None, delay: float = 0.0
    ) -> None:
        return None

    async def subscribe(self, subscription: Subscription) -> AsyncGenerator[Delivery, None]:
        return
        yield

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("narrow", "capability"),
    [(as_inspectable, "Inspectable"), (as_dead_letter_store, "DeadLetterStore")],
)
def test_backend_without_a_capability_is_named_in_one_line(
    narrow: Callable[[Broker], object], capability: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit) as exited:
        narrow(_PublishOnly())
    assert exited.value.exit_code == 1
    message = capsys.readouterr().err
    assert "_PublishOnly backend cannot" in message
    assert capability in message


# -- errors --------------------------------------------------------------------------


def test_bad_broker_url_is_one_red_line_with_exit_code_1() -> None:
    result = cli("topics", "--broker", "nope")
    assert result.exit_code == 1
    assert "sqlite:///" in one_error_line(result)


def test_missing_broker_file_is_reported_and_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("dlq", "list")
    assert result.exit_code == 1
    assert "no wirework broker file" in one_error_line(result)
    assert not (tmp_path / "wirework.db").exists()


def test_unknown_dead_letter_id_says_how_to_find_ids(url: str) -> None:
    seed(url, "orders", "billing")
    result = cli("dlq", "show", "no-such-id", "--broker", url)
    assert result.exit_code == 1
    assert "wirework dlq list" in one_error_line(result)


def test_locked_broker_is_reported_as_busy_and_nothing_moves(url: str, tmp_path: Path) -> None:
    [dead] = seed(url, "orders", "billing")
    holder = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = cli("dlq", "replay", dead, "--yes", "--broker", url + "&busy_timeout=0.2")
    finally:
        holder.close()
    assert result.exit_code == 1
    assert "retry" in one_error_line(result)
    assert dead_letter_ids(url) == [dead]


# -- topics --------------------------------------------------------------------------


def test_topics_json_reports_counts_per_group_and_topics_without_groups(url: str) -> None:
    seed(url, "orders", "billing", 3)
    asyncio.run(_publish(url, "orders", 2))
    asyncio.run(_publish(url, "audit", 1))
    result = cli("topics", "--json", "--broker", url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"topic": "audit", "group": None, "ready": 1, "delayed": 0, "in_flight": 0,
         "dead_lettered": 0, "backlog": 1},
        {"topic": "orders", "group": "billing", "ready": 2, "delayed": 0, "in_flight": 0,
         "dead_lettered": 3, "backlog": 2},
    ]  # fmt: skip


async def _publish(url: str, topic: str, count: int) -> None:
    async with connect(url) as broker:
        for _ in range(count):
            await broker.publish(topic, encode_binary(Envelope.new("t", source="tests")))


def test_topics_table_piped_has_no_colour_and_one_line_per_row(url: str) -> None:
    topic, group = "orders." + "t" * 150, "billing-" + "g" * 100
    seed(url, topic, group, 2)
    result = cli("topics", "--broker", url)
    assert result.exit_code == 0, result.output
    assert not ANSI.search(result.stdout)
    [row] = [line for line in result.stdout.splitlines() if topic in line]
    assert group in row
    assert row.split()[-5:] == ["0", "0", "0", "2", "0"]


def test_topics_default_broker_comes_from_the_environment(url: str) -> None:
    seed(url, "orders", "billing")
    result = cli("topics", "--json", env={"WIREWORK_BROKER": url})
    assert result.exit_code == 0, result.output
    assert [row["topic"] for row in json.loads(result.stdout)] == ["orders"]


def test_memory_broker_warns_that_it_is_per_process() -> None:
    result = cli("topics", "--broker", "memory://")
    assert result.exit_code == 0, result.output
    assert "memory://" in result.stderr
    assert "No topics yet." in result.stdout


# -- dlq list / show -----------------------------------------------------------------


def test_dlq_list_filters_by_topic_group_and_reason(url: str) -> None:
    seed(url, "orders", "billing", 2)
    seed(url, "payments", "billing", reason=DeadLetterReason.MAX_DELIVERIES)
    seed(url, "payments", "ledger")
    assert len(dead_letter_ids(url)) == 4
    assert len(dead_letter_ids(url, topic="orders")) == 2
    assert len(dead_letter_ids(url, group="billing")) == 3
    assert len(dead_letter_ids(url, reason="max_deliveries")) == 1
    assert len(dead_letter_ids(url, topic="payments", reason="REJECTED")) == 1


def test_dlq_list_json_carries_the_record_without_the_body(url: str) -> None:
    [dead] = seed(url, "orders", "billing", error=Failure(error_type="app.Boom", message="no"))
    result = cli("dlq", "list", "--json", "--broker", url)
    [row] = json.loads(result.stdout)
    assert row["id"] == dead
    assert row["reason"] == "rejected"
    assert row["error"] == {"error_type": "app.Boom", "message": "no", "field": None}
    assert "body_base64" not in row
    assert {"message_id", "attempts", "first_failure_at", "last_failure_at"} <= row.keys()


def test_dlq_list_table_keeps_each_record_on_one_line_and_notes_the_limit(url: str) -> None:
    ids = seed(url, "orders", "billing", 3, error=Failure(error_type="E", message="a\nb\x1b[31m"))
    result = cli("dlq", "list", "--limit", "2", "--broker", url)
    assert result.exit_code == 0, result.output
    assert not ANSI.search(result.stdout)
    rows = [line for line in result.stdout.splitlines() if "orders" in line]
    assert [row.split()[0] for row in rows] == ids[:2]
    assert all("E: a\\x0ab\\x1b[31m" in row for row in rows)
    assert "--limit" in result.stderr


def test_dlq_show_json_round_trips_a_binary_body(url: str) -> None:
    body = bytes(range(256))
    [dead] = seed(url, "orders", "billing", message=WireMessage(headers={"x": "1"}, body=body))
    result = cli("dlq", "show", dead, "--json", "--broker", url)
    shown = json.loads(result.stdout)
    assert base64.b64decode(shown["body_base64"]) == body
    assert shown["body_text"] is None
    assert shown["headers"] == {"x": "1"}


def test_dlq_show_pretty_prints_a_json_body(url: str) -> None:
    message = WireMessage(headers={"ce-id": "e1"}, body=b'{"order":7}')
    [dead] = seed(url, "orders", "billing", message=message)
    result = cli("dlq", "show", dead, "--broker", url)
    assert result.exit_code == 0, result.output
    assert '"order": 7' in result.stdout
    assert "e1" in result.stdout


# -- dlq replay ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [[], ["--topic", "orders"], ["some-id", "--all-matching"], ["some-id", "--group", "g"]],
    ids=["nothing", "filters-without-all-matching", "ids-and-all-matching", "ids-and-filters"],
)
def test_replay_refuses_an_ambiguous_selection_as_a_usage_error(
    url: str, selection: Sequence[str]
) -> None:
    result = cli("dlq", "replay", *selection, "--yes", "--broker", url)
    assert result.exit_code == 2
    one_error_line(result)


def test_replay_without_yes_off_a_terminal_refuses_and_moves_nothing(url: str) -> None:
    [dead] = seed(url, "orders", "billing")
    result = cli("dlq", "replay", dead, "--broker", url)
    assert result.exit_code == 2
    assert "--yes" in one_error_line(result)
    assert dead_letter_ids(url) == [dead]


def test_replay_by_id_hands_the_message_back_to_its_group(url: str) -> None:
    first, second = seed(url, "orders", "billing", 2)
    original = asyncio.run(_show_message_id(url, first))
    result = cli("dlq", "replay", first, "--yes", "--broker", url)
    assert result.exit_code == 0, result.output
    assert "Replayed 1 dead letter." in result.stdout
    assert dead_letter_ids(url) == [second]
    again = asyncio.run(_next_delivery(url, "orders", "billing"))
    assert again.message_id == original


async def _show_message_id(url: str, dead_letter_id: str) -> str | None:
    async with connect(url) as broker:
        return (await as_dead_letter_store(broker).dead_letter(dead_letter_id)).message_id


def test_replay_with_an_unknown_id_moves_none_of_the_ids(url: str) -> None:
    [dead] = seed(url, "orders", "billing")
    result = cli("dlq", "replay", dead, "missing-1", "--yes", "--broker", url)
    assert result.exit_code == 1
    assert "'missing-1'" in one_error_line(result)
    assert dead_letter_ids(url) == [dead]


def test_replay_dry_run_lists_the_matches_and_moves_nothing(url: str) -> None:
    ids = seed(url, "orders", "billing", 2)
    seed(url, "payments", "billing")
    result = cli(
        "dlq", "replay", "--all-matching", "--topic", "orders", "--dry-run", "--broker", url
    )
    assert result.exit_code == 0, result.output
    assert all(dead in result.stdout for dead in ids)
    assert "would replay 2 dead letters" in result.stdout
    assert len(dead_letter_ids(url)) == 3


def test_replay_all_matching_moves_only_the_matches_in_batches(url: str) -> None:
    seed(url, "orders", "billing", 250)
    [other] = seed(url, "payments", "billing")
    result = cli("dlq", "replay", "--all-matching", "--topic", "orders", "--yes", "--broker", url)
    assert result.exit_code == 0, result.output
    assert "Replayed 250 dead letters." in result.stdout
    assert dead_letter_ids(url) == [other]


async def test_replay_skips_and_counts_ids_replayed_elsewhere_meanwhile(url: str) -> None:
    ids = await _seed(url, "orders", "billing", 3)
    async with connect(url) as broker:
        store = as_dead_letter_store(broker)
        await store.replay([ids[1]])
        outcome = await replay_all(store, ids, progress_console=Console(file=io.StringIO()))
        assert (outcome.moved, outcome.gone) == (2, 1)
        assert await store.dead_letters() == []


@pytest.mark.parametrize(("answer", "code", "left"), [(b"y\n", 0, 0), (b"n\n", 1, 1)])
def test_replay_on_a_terminal_asks_first(url: str, answer: bytes, code: int, left: int) -> None:
    [dead] = seed(url, "orders", "billing")
    exit_code, output = _in_terminal(["dlq", "replay", dead, "--broker", url], answer)
    assert "Replay 1 dead letter to the groups that failed them?" in output
    assert exit_code == code, output
    assert len(dead_letter_ids(url)) == left


def _in_terminal(args: Sequence[str], answer: bytes) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, answering its prompt once it appears."""
    main, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    command = [sys.executable, "-m", "wirework.cli.main", *args]
    process = subprocess.Popen(command, stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    seen, answered, deadline = b"", False, time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], deadline - time.monotonic())
            if not ready:
                continue
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(main, answer)
                answered = True
        return process.wait(timeout=30), ANSI.sub("", seen.decode(errors="replace"))
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
