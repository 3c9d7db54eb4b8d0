"""``wirework trace``: a stored trace drawn as a waterfall, recent traces listed, lookups."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tracing.spans import SECOND, finished
from wirework.cli import trace as trace_cli
from wirework.cli.main import app
from wirework.tracing.span_store import DEFAULT_PATH, SpanStore, SpanStoreExporter

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
OTHER = 0x1111111111111111111111111111111A


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "spans.db"
    now = time.time_ns()
    exporter = SpanStoreExporter(SpanStore(path))
    exporter.export(
        [
            finished(
                TRACE,
                1,
                end_ns=now,
                duration_ns=SECOND,
                name="orders publish",
                service="shop",
                attributes={"wirework.correlation_id": "corr-1", "wirework.key": "order-7"},
            ),
            finished(
                TRACE,
                2,
                end_ns=now - SECOND // 10,
                duration_ns=SECOND // 2,
                parent_id=1,
                name="orders process",
                service="billing",
            ),
            finished(
                TRACE,
                3,
                end_ns=now - SECOND // 5,
                duration_ns=SECOND // 10,
                parent_id=2,
                name="payments charge",
                service="payments",
                error=True,
            ),
            finished(OTHER, 1, end_ns=now - 60 * SECOND, name="stock publish", service="inventory"),
        ]
    )
    exporter.shutdown()
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["trace", *args])
    return result.exit_code, result.stdout, result.stderr


def test_a_trace_is_drawn_as_a_waterfall(store: Path) -> None:
    code, out, _ = invoke(f"{TRACE:032x}", "--store", str(store))
    assert code == 0, out
    assert f"trace {TRACE:032x}" in out
    assert "3 spans" in out
    assert "error" in out
    lines = out.splitlines()
    rows = {
        name: next(line for line in lines if name in line)
        for name in ("orders publish", "orders process", "payments charge")
    }
    # Children are indented under their parents, in start order.
    indent = {name: row.index(name) for name, row in rows.items()}
    assert indent["orders publish"] < indent["orders process"] < indent["payments charge"]
    assert lines.index(rows["orders publish"]) < lines.index(rows["orders process"])
    assert "shop" in rows["orders publish"]
    assert "payments" in rows["payments charge"]
    assert "✗" in rows["payments charge"]
    assert "1.00 s" in rows["orders publish"]
    assert "500.0 ms" in rows["orders process"]
    # The root's bar spans the whole axis; the child's starts later and is shorter.
    assert rows["orders publish"].count("█") == trace_cli.BAR_WIDTH
    assert 0 < rows["payments charge"].count("█") < rows["orders process"].count("█")


def test_a_prefix_of_the_id_is_enough(store: Path) -> None:
    code, out, _ = invoke("4bf92f", "--store", str(store))
    assert code == 0
    assert "orders process" in out


def test_the_last_traces_are_listed_newest_first(store: Path) -> None:
    code, out, _ = invoke("--last", "5", "--store", str(store))
    assert code == 0
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if f"{TRACE:032x}" in line)
    second = next(i for i, line in enumerate(lines) if f"{OTHER:032x}" in line)
    assert first < second
    assert "shop: orders publish" in lines[first]
    assert "shop, billing, payments" in lines[first]
    assert "error" in lines[first]
    assert "ok" in lines[second]
    assert " 3 " in lines[first]


def test_with_no_argument_the_recent_traces_are_listed(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREWORK_SPAN_STORE", str(store))
    code, out, _ = invoke()
    assert code == 0
    assert f"{OTHER:032x}" in out


@pytest.mark.parametrize(
    "lookup", [["--correlation", "corr-1"], ["--key", "order-7"]], ids=["correlation", "key"]
)
def test_lookups_draw_the_one_trace_found(store: Path, lookup: list[str]) -> None:
    code, out, _ = invoke(*lookup, "--store", str(store))
    assert code == 0
    assert f"trace {TRACE:032x}" in out
    assert "payments charge" in out


def test_a_lookup_without_match_says_so(store: Path) -> None:
    code, out, _ = invoke("--saga", "nope", "--store", str(store))
    assert code == 0
    assert "No trace matches." in out


def test_json_output(store: Path) -> None:
    code, out, _ = invoke(f"{TRACE:032x}", "--json", "--store", str(store))
    assert code == 0
    document = json.loads(out)
    assert [s["name"] for s in document["spans"]] == [
        "orders publish",
        "orders process",
        "payments charge",
    ]
    code, out, _ = invoke("--last", "1", "--json", "--store", str(store))
    assert [t["status"] for t in json.loads(out)] == ["error"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ffff"], 1, "no trace 'ffff'"),
        (["--last", "2", "--key", "k"], 2, "give one of"),
    ],
)
def test_mistakes_get_one_line_and_an_exit_code(
    store: Path, args: list[str], code: int, message: str
) -> None:
    got, _, err = invoke(*args, "--store", str(store))
    assert got == code
    assert message in err


def test_a_missing_store_is_named(tmp_path: Path) -> None:
    code, _, err = invoke("--store", str(tmp_path / "none.db"))
    assert code == 1
    assert "no span store at" in err
    assert not (tmp_path / "none.db").exists()


def test_the_cli_default_store_is_the_span_stores() -> None:
    assert trace_cli.DEFAULT_STORE == DEFAULT_PATH


def test_the_command_line_loads_without_the_tracing_stack() -> None:
    """``wirework --help`` must not need the tracing extra; only ``wirework trace`` does."""
    import subprocess
    import sys

    code = (
        "import sys, wirework.cli.main; "
        "sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
