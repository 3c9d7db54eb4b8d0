"""The embedded span store: what it keeps, for how long, and how a trace is found again."""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.tracing.spans import SECOND, finished
from wirework.errors import ConfigurationError
from wirework.tracing.span_store import SpanStore, SpanStoreExporter


def test_the_store_keeps_at_most_max_spans_the_newest(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db", max_spans=10)
    exporter = SpanStoreExporter(store)
    now = time.time_ns()
    for batch in range(5):
        spans = [finished(batch + 1, n + 1, end_ns=now + batch * 10 + n) for n in range(5)]
        exporter.export(spans)
        assert store.count() == min(10, (batch + 1) * 5)
    assert sorted(t.trace_id for t in store.recent(10)) == [f"{4:032x}", f"{5:032x}"]
    exporter.shutdown()


def test_spans_older_than_max_age_are_removed_as_new_ones_arrive(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db", max_age=timedelta(hours=1))
    exporter = SpanStoreExporter(store)
    now = time.time_ns()
    exporter.export([finished(1, 1, end_ns=now - 7200 * SECOND)])
    exporter.export([finished(2, 1, end_ns=now - 60 * SECOND)])
    assert [t.trace_id for t in store.recent()] == [f"{2:032x}"]
    exporter.shutdown()


def test_a_trace_is_summarised_from_its_root(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db")
    now = time.time_ns()
    SpanStoreExporter(store).export(
        [
            finished(
                7, 1, end_ns=now, duration_ns=5 * SECOND, name="orders publish", service="shop"
            ),
            finished(
                7,
                2,
                end_ns=now - SECOND,
                duration_ns=3 * SECOND,
                parent_id=1,
                name="orders process",
                service="billing",
            ),
            finished(7, 3, end_ns=now - 2 * SECOND, parent_id=2, service="billing", error=True),
        ]
    )
    (summary,) = store.recent()
    assert summary.root_name == "orders publish"
    assert summary.root_service == "shop"
    assert summary.services == ["shop", "billing"]
    assert (summary.spans, summary.errors, summary.status) == (3, 1, "error")
    assert summary.duration == pytest.approx(5.0)
    spans = store.spans(summary.trace_id)
    assert [s.span_id for s in spans] == [f"{1:016x}", f"{2:016x}", f"{3:016x}"]
    assert spans[1].parent_id == f"{1:016x}"
    assert spans[2].status_message == "boom"


def test_traces_are_found_by_correlation_saga_and_key(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db")
    now = time.time_ns()
    SpanStoreExporter(store).export(
        [
            finished(1, 1, end_ns=now, attributes={"wirework.correlation_id": "c-1"}),
            finished(2, 1, end_ns=now, attributes={"wirework.saga_id": "s-1"}),
            finished(3, 1, end_ns=now, attributes={"wirework.key": "order-9"}),
            finished(4, 1, end_ns=now + 1, attributes={"wirework.key": "order-9"}),
        ]
    )
    assert [t.trace_id for t in store.find(correlation_id="c-1")] == [f"{1:032x}"]
    assert [t.trace_id for t in store.find(saga_id="s-1")] == [f"{2:032x}"]
    assert [t.trace_id for t in store.find(key="order-9")] == [f"{4:032x}", f"{3:032x}"]
    assert store.find(key="nothing") == []
    with pytest.raises(ConfigurationError, match="correlation_id"):
        store.find()


def test_a_trace_id_prefix_resolves(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db")
    now = time.time_ns()
    SpanStoreExporter(store).export(
        [finished(0xABC << 116, 1, end_ns=now), finished(0xABD << 116, 1, end_ns=now)]
    )
    assert store.resolve("abc") == [f"{0xABC << 116:032x}"]
    assert len(store.resolve("ab")) == 2
    assert store.resolve("zz") == []
    assert store.resolve("'; drop table spans; --") == []


def test_the_same_span_exported_twice_is_kept_once(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db")
    span = finished(1, 1, end_ns=time.time_ns())
    SpanStoreExporter(store).export([span, span])
    SpanStoreExporter(store).export([span])
    assert store.count() == 1


def test_attributes_of_every_kind_come_back_as_json_gives_them(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "spans.db")
    attributes = {"text": "café ☕", "n": 3, "x": 1.5, "yes": True, "tags": ("a", "b")}
    odd = {**attributes, "odd": Path("/x")}  # not an attribute type: kept as its str()
    SpanStoreExporter(store).export([finished(1, 1, end_ns=time.time_ns(), attributes=odd)])
    (record,) = store.spans(f"{1:032x}")
    assert record.attributes == {**attributes, "tags": ["a", "b"], "odd": "/x"}


def test_the_file_is_private_and_readers_need_it_to_exist(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "spans.db"
    with pytest.raises(ConfigurationError, match="no span store"):
        SpanStore(path, create=False)
    SpanStore(path).open()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_an_unusable_path_fails_at_open_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-db").write_text("plain text, not SQLite" * 100)
    with pytest.raises(ConfigurationError, match=r"cannot use .* as a span store"):
        SpanStore(tmp_path / "not-a-db").open()


@pytest.mark.parametrize(("max_spans", "hours"), [(0, 1), (10, 0)])
def test_bounds_must_be_positive(tmp_path: Path, max_spans: int, hours: int) -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        SpanStore(tmp_path / "s.db", max_spans=max_spans, max_age=timedelta(hours=hours))


@pytest.mark.parametrize(
    "value",
    [
        "thé ✓",  # non-ASCII: orjson writes UTF-8 where json escaped it
        "\ud800",  # a lone surrogate: orjson refuses it
        2**70,  # beyond 64 bits: orjson refuses it
        float("nan"),  # orjson would write null
        float("-inf"),
        (1, 2.5, "x", True),
        "null",
    ],
    ids=["non-ascii", "surrogate", "big-int", "nan", "infinity", "sequence", "null-text"],
)
def test_an_attribute_reads_back_as_json_wrote_it(tmp_path: Path, value: object) -> None:
    """Attributes are written by orjson where it writes what ``json`` did, else by ``json``."""
    store = SpanStore(tmp_path / "spans.db")
    exporter = SpanStoreExporter(store)
    exporter.export([finished(1, 1, end_ns=time.time_ns(), attributes={"v": value, "n": 1})])
    [span] = store.spans(f"{1:032x}")
    expected = json.loads(json.dumps({"v": value, "n": 1}))
    # repr: NaN is not equal to itself, and its repr is the same for both.
    assert repr(span.attributes) == repr(expected)
    exporter.shutdown()
