"""W3C Trace Context and B3, case by case, the way the W3C test harness asks.

Each W3C case sends headers into one hop (extract, start a span, inject) and
reads what goes out, as ``w3c/trace-context: test/test.py`` does against a
service: a valid parent keeps its trace id under a new parent id, anything
invalid restarts the trace, and a bad tracestate is discarded, never an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.span import TraceState

from wirework.errors import ConfigurationError
from wirework.tracing.propagation import (
    B3Propagator,
    Carrier,
    TraceContextPropagator,
    build_propagation,
    extract,
    format_tracestate,
    inject,
    parse_tracestate,
)

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
VALID = f"00-{TRACE}-{PARENT}-01"

W3C = TraceContextPropagator()


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    made = TracerProvider(shutdown_on_exit=False)
    yield made
    made.shutdown()


def hop(
    provider: TracerProvider, headers: Carrier, propagator: TextMapPropagator = W3C
) -> dict[str, str]:
    """What a service that received ``headers`` sends on its next outgoing call."""
    context = extract(headers, propagator=propagator)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("hop", context=context):
        return dict(inject({}, propagator=propagator))


def trace_id(outgoing: dict[str, str]) -> str:
    version, trace, parent, flags = outgoing["traceparent"].split("-")
    assert (version, len(trace), len(parent), len(flags)) == ("00", 32, 16, 2)
    return trace


def parent_id(outgoing: dict[str, str]) -> str:
    return outgoing["traceparent"].split("-")[2]


def tracestate(outgoing: dict[str, str]) -> dict[str, str]:
    raw = outgoing.get("tracestate", "")
    return dict(member.split("=", 1) for member in raw.split(",") if member)


# -- traceparent: (case, headers sent, whether the trace id is kept) ---------------------

TRACEPARENT_CASES: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("both missing", [], False),
    ("traceparent only", [("traceparent", VALID)], True),
    (
        "duplicated",
        [
            ("traceparent", f"00-{TRACE[:-1]}1-{PARENT}-01"),
            ("traceparent", VALID),
        ],
        False,
    ),
    ("duplicated, one in other case", [("traceparent", VALID), ("TraceParent", VALID)], False),
    ("name trace-parent", [("trace-parent", VALID)], False),
    ("name trace.parent", [("trace.parent", VALID)], False),
    ("name TraceParent", [("TraceParent", VALID)], True),
    ("name TrAcEpArEnT", [("TrAcEpArEnT", VALID)], True),
    ("name TRACEPARENT", [("TRACEPARENT", VALID)], True),
    ("version 00 trailing dot", [("traceparent", VALID + ".")], False),
    (
        "version 00 trailing fields",
        [("traceparent", VALID + "-what-the-future-will-be-like")],
        False,
    ),
    ("version cc", [("traceparent", f"cc-{TRACE}-{PARENT}-01")], True),
    (
        "version cc trailing fields",
        [("traceparent", f"cc-{TRACE}-{PARENT}-01-what-the-future")],
        True,
    ),
    (
        "version cc trailing dot",
        [("traceparent", f"cc-{TRACE}-{PARENT}-01.what-the-future")],
        False,
    ),
    ("version ff", [("traceparent", f"ff-{TRACE}-{PARENT}-01")], False),
    ("version .0", [("traceparent", f".0-{TRACE}-{PARENT}-01")], False),
    ("version 0.", [("traceparent", f"0.-{TRACE}-{PARENT}-01")], False),
    ("version uppercase", [("traceparent", f"0A-{TRACE}-{PARENT}-01")], False),
    ("version too long", [("traceparent", f"000-{TRACE}-{PARENT}-01")], False),
    ("version much too long", [("traceparent", f"0000-{TRACE}-{PARENT}-01")], False),
    ("version too short", [("traceparent", f"0-{TRACE}-{PARENT}-01")], False),
    ("trace id all zero", [("traceparent", f"00-{'0' * 32}-{PARENT}-01")], False),
    ("trace id leading dot", [("traceparent", f"00-.{TRACE[1:]}-{PARENT}-01")], False),
    ("trace id trailing dot", [("traceparent", f"00-{TRACE[:-1]}.-{PARENT}-01")], False),
    ("trace id uppercase", [("traceparent", f"00-{TRACE[:-1]}A-{PARENT}-01")], False),
    ("trace id too long", [("traceparent", f"00-{TRACE}3-{PARENT}-01")], False),
    ("trace id too short", [("traceparent", f"00-{TRACE[:-1]}-{PARENT}-01")], False),
    ("parent id all zero", [("traceparent", f"00-{TRACE}-{'0' * 16}-01")], False),
    ("parent id leading dot", [("traceparent", f"00-{TRACE}-.{PARENT[1:]}-01")], False),
    ("parent id trailing dot", [("traceparent", f"00-{TRACE}-{PARENT[:-1]}.-01")], False),
    ("parent id too long", [("traceparent", f"00-{TRACE}-{PARENT}7-01")], False),
    ("parent id too short", [("traceparent", f"00-{TRACE}-{PARENT[:-1]}-01")], False),
    ("flags leading dot", [("traceparent", f"00-{TRACE}-{PARENT}-.0")], False),
    ("flags trailing dot", [("traceparent", f"00-{TRACE}-{PARENT}-0.")], False),
    ("flags too long", [("traceparent", f"00-{TRACE}-{PARENT}-001")], False),
    ("flags too short", [("traceparent", f"00-{TRACE}-{PARENT}-1")], False),
    ("OWS leading space", [("traceparent", " " + VALID)], True),
    ("OWS leading tab", [("traceparent", "\t" + VALID)], True),
    ("OWS trailing space", [("traceparent", VALID + " ")], True),
    ("OWS trailing tab", [("traceparent", VALID + "\t")], True),
    ("OWS both sides", [("traceparent", "\t " + VALID + " \t")], True),
    ("empty value", [("traceparent", "")], False),
    ("two values in one header", [("traceparent", VALID + "," + VALID)], False),
    ("absurdly long", [("traceparent", f"cc-{TRACE}-{PARENT}-01-" + "x" * 10_000)], False),
]


@pytest.mark.parametrize(
    ("headers", "kept"),
    [pytest.param(h, k, id=name) for name, h, k in TRACEPARENT_CASES],
)
def test_traceparent(provider: TracerProvider, headers: list[tuple[str, str]], kept: bool) -> None:
    outgoing = hop(provider, headers)
    assert (trace_id(outgoing) == TRACE) is kept
    assert parent_id(outgoing) != PARENT
    assert trace_id(outgoing) != "0" * 32


def test_a_kept_trace_carries_the_sampled_flag(provider: TracerProvider) -> None:
    assert hop(provider, [("traceparent", VALID)])["traceparent"].endswith("-01")


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", VALID)],
        [],
        [("traceparent", f"00-{'0' * 32}-{PARENT}-01")],
    ],
    ids=["valid", "none", "illegal"],
)
def test_each_outgoing_call_gets_its_own_parent_id(
    provider: TracerProvider, headers: list[tuple[str, str]]
) -> None:
    """The harness's AdvancedTest: three callbacks, one trace id, three parent ids."""
    context = extract(headers, propagator=W3C)
    tracer = provider.get_tracer("test")
    sent: list[dict[str, str]] = []
    with tracer.start_as_current_span("server", context=context):
        for _ in range(3):
            with tracer.start_as_current_span("client"):
                sent.append(dict(inject({}, propagator=W3C)))
    assert len({trace_id(s) for s in sent}) == 1
    assert len({parent_id(s) for s in sent}) == 3
    assert (trace_id(sent[0]) == TRACE) is (headers == [("traceparent", VALID)])
    assert trace_id(sent[0]) != "0" * 32


# -- tracestate: (case, tracestate headers sent with a valid traceparent, expected) -------

KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE = "".join(
    [
        "".join(map(chr, range(0x20, 0x2B + 1))),
        "".join(map(chr, range(0x2D, 0x3C + 1))),
        "".join(map(chr, range(0x3E, 0x7E + 1))),
    ]
)
MEMBERS_32 = [
    ",".join(f"bar{n:02d}={n:02d}" for n in range(start, start + 10)) for start in (1, 11, 21)
]

TRACESTATE_CASES: list[tuple[str, list[tuple[str, str]], dict[str, str]]] = [
    ("inherited", [("tracestate", "foo=1,bar=2")], {"foo": "1", "bar": "2"}),
    ("name trace-state", [("trace-state", "foo=1")], {}),
    ("name trace.state", [("trace.state", "foo=1")], {}),
    ("name TraceState", [("TraceState", "foo=1")], {"foo": "1"}),
    ("name TrAcEsTaTe", [("TrAcEsTaTe", "foo=1")], {"foo": "1"}),
    ("name TRACESTATE", [("TRACESTATE", "foo=1")], {"foo": "1"}),
    ("empty", [("tracestate", "")], {}),
    ("empty after", [("tracestate", "foo=1"), ("tracestate", "")], {"foo": "1"}),
    ("empty before", [("tracestate", ""), ("tracestate", "foo=1")], {"foo": "1"}),
    ("empty members", [("tracestate", "foo=1,, ,bar=2")], {"foo": "1", "bar": "2"}),
    (
        "multiple headers",
        [("tracestate", "foo=1,bar=2"), ("tracestate", "rojo=1,congo=2"), ("tracestate", "baz=3")],
        {"foo": "1", "bar": "2", "rojo": "1", "congo": "2", "baz": "3"},
    ),
    ("duplicated key", [("tracestate", "foo=1,foo=1")], {}),
    ("duplicated key, other value", [("tracestate", "foo=1,foo=2")], {}),
    ("duplicated key across headers", [("tracestate", "foo=1"), ("tracestate", "foo=1")], {}),
    ("duplicated key, two headers", [("tracestate", "foo=1"), ("tracestate", "foo=2")], {}),
    ("all legal characters", [("tracestate", f"{KEY}={VALUE}")], {KEY: VALUE}),
    (
        "all legal characters, vendor key",
        [("tracestate", f"{KEY}@a-z0-9_-*/={VALUE}")],
        {f"{KEY}@a-z0-9_-*/": VALUE},
    ),
    (
        "OWS around members",
        [("tracestate", "foo=1 \t , \t bar=2, \t baz=3")],
        {"foo": "1", "bar": "2", "baz": "3"},
    ),
    (
        "OWS tabs",
        [("tracestate", "foo=1\t \t,\t \tbar=2,\t \tbaz=3")],
        {"foo": "1", "bar": "2", "baz": "3"},
    ),
    ("OWS leading space", [("tracestate", " foo=1")], {"foo": "1"}),
    ("OWS leading tab", [("tracestate", "\tfoo=1")], {"foo": "1"}),
    ("OWS trailing space", [("tracestate", "foo=1 ")], {"foo": "1"}),
    ("OWS trailing tab", [("tracestate", "foo=1\t")], {"foo": "1"}),
    ("OWS both", [("tracestate", "\t foo=1 \t")], {"foo": "1"}),
    ("key with space", [("tracestate", "foo =1")], {}),
    ("key uppercase", [("tracestate", "FOO=1")], {}),
    ("key with dot", [("tracestate", "foo.bar=1")], {}),
    ("vendor empty", [("tracestate", "foo@=1,bar=2")], {}),
    ("tenant empty", [("tracestate", "@foo=1,bar=2")], {}),
    ("two @", [("tracestate", "foo@@bar=1,bar=2")], {}),
    ("three parts", [("tracestate", "foo@bar@baz=1,bar=2")], {}),
    (
        "32 members",
        [*(("tracestate", m) for m in MEMBERS_32), ("tracestate", "bar31=31,bar32=32")],
        {f"bar{n:02d}": f"{n:02d}" for n in range(1, 33)},
    ),
    (
        "33 members",
        [*(("tracestate", m) for m in MEMBERS_32), ("tracestate", "bar31=31,bar32=32,bar33=33")],
        {},
    ),
    (
        "key of 256",
        [("tracestate", "foo=1"), ("tracestate", "z" * 256 + "=1")],
        {"foo": "1", "z" * 256: "1"},
    ),
    ("key of 257", [("tracestate", "foo=1"), ("tracestate", "z" * 257 + "=1")], {}),
    (
        "tenant 241, vendor 14",
        [("tracestate", "foo=1"), ("tracestate", "t" * 241 + "@" + "v" * 14 + "=1")],
        {"foo": "1", "t" * 241 + "@" + "v" * 14: "1"},
    ),
    ("tenant 242", [("tracestate", "foo=1"), ("tracestate", "t" * 242 + "@v=1")], {}),
    ("vendor 15", [("tracestate", "foo=1"), ("tracestate", "t@" + "v" * 15 + "=1")], {}),
    ("value with =", [("tracestate", "foo=bar=baz")], {}),
    ("empty value", [("tracestate", "foo=,bar=3")], {}),
    ("value of 257", [("tracestate", "foo=" + "v" * 257)], {}),
    ("no =", [("tracestate", "foo")], {}),
]


def _expected_members(expected: dict[str, str]) -> dict[str, str]:
    """What goes out: the members within 512 characters (the long ones are cut first)."""
    state = TraceState(list(expected.items())) if expected else None
    if state is None:
        return {}
    return dict(m.split("=", 1) for m in format_tracestate(state).split(",") if m)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [pytest.param(h, e, id=name) for name, h, e in TRACESTATE_CASES],
)
def test_tracestate(
    provider: TracerProvider, headers: list[tuple[str, str]], expected: dict[str, str]
) -> None:
    outgoing = hop(provider, [("traceparent", f"00-{TRACE}-{PARENT}-00"), *headers])
    assert trace_id(outgoing) == TRACE
    assert tracestate(outgoing) == _expected_members(expected)


def test_multiple_tracestate_headers_keep_their_order(provider: TracerProvider) -> None:
    outgoing = hop(
        provider,
        [
            ("traceparent", VALID),
            ("tracestate", "foo=1,bar=2"),
            ("tracestate", "rojo=1,congo=2"),
            ("tracestate", "baz=3"),
        ],
    )
    assert outgoing["tracestate"] == "foo=1,bar=2,rojo=1,congo=2,baz=3"


@pytest.mark.parametrize(
    "headers",
    [[("tracestate", "foo=1")], [("tracestate", "foo=1,bar=2")]],
    ids=["one member", "two members"],
)
def test_tracestate_without_traceparent_is_discarded(
    provider: TracerProvider, headers: list[tuple[str, str]]
) -> None:
    assert "tracestate" not in hop(provider, headers)


def test_tracestate_with_an_invalid_traceparent_is_discarded(provider: TracerProvider) -> None:
    outgoing = hop(provider, [("traceparent", f"ff-{TRACE}-{PARENT}-01"), ("tracestate", "a=1")])
    assert trace_id(outgoing) != TRACE
    assert "tracestate" not in outgoing


# -- tracestate limits going out ---------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "kept"),
    [
        pytest.param([("a", "1"), ("b", "2")], ["a", "b"], id="short: untouched"),
        pytest.param(
            [("big", "x" * 200), *[(f"k{n:02d}", "v" * 20) for n in range(20)]],
            [f"k{n:02d}" for n in range(20)],
            id="over 512: the member over 128 goes first",
        ),
        pytest.param(
            [(f"k{n:02d}", "v" * 60) for n in range(10)],
            [f"k{n:02d}" for n in range(7)],
            id="over 512 with small members: from the right",
        ),
        pytest.param(
            [(f"k{n:02d}", "v" * 200) for n in range(3)],
            ["k00", "k01"],
            id="only large members: rightmost large ones go first",
        ),
    ],
)
def test_tracestate_is_truncated_to_512_characters(
    members: list[tuple[str, str]], kept: list[str]
) -> None:
    header = format_tracestate(TraceState(members))
    assert len(header) <= 512
    assert [m.split("=", 1)[0] for m in header.split(",")] == kept


def test_a_parsed_tracestate_round_trips_in_order() -> None:
    state = parse_tracestate(["b=2, a=1", "c=3"])
    assert state is not None
    assert format_tracestate(state) == "b=2,a=1,c=3"


# -- carriers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "carrier",
    [
        pytest.param({"TraceParent": VALID}, id="mapping, any case"),
        pytest.param({"traceparent": [VALID]}, id="mapping of lists"),
        pytest.param([("TRACEPARENT", VALID), ("x-other", "1")], id="pairs (gRPC metadata)"),
        pytest.param([(b"traceparent", VALID.encode())], id="raw ASGI byte pairs"),
        pytest.param([("traceparent", VALID), ("grpc-bin", b"\x00")], id="binary metadata"),
    ],
)
def test_any_carrier_shape_is_read(provider: TracerProvider, carrier: Carrier) -> None:
    assert trace_id(hop(provider, carrier)) == TRACE


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": None},
        {"traceparent": 42},
        [("traceparent",)],
        [None],
        {"traceparent": ["\x00" * 55]},
        {"tracestate": "\u202e=1", "traceparent": "\U0001f600" * 55},
    ],
)
def test_garbage_never_raises_and_restarts_the_trace(
    provider: TracerProvider, carrier: object
) -> None:
    outgoing = hop(provider, carrier)  # type: ignore[arg-type]
    assert trace_id(outgoing) != TRACE


# -- B3 ----------------------------------------------------------------------------------

B3_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"
B3_PARENT = "05e3ac9a4f6e3b90"

B3_CASES: list[tuple[str, list[tuple[str, str]], str | None, str]] = [
    ("single", [("b3", f"{B3_TRACE}-{B3_SPAN}-1")], B3_TRACE, "1"),
    ("single with parent", [("b3", f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}")], B3_TRACE, "1"),
    ("single not sampled", [("b3", f"{B3_TRACE}-{B3_SPAN}-0")], B3_TRACE, "0"),
    ("single debug", [("b3", f"{B3_TRACE}-{B3_SPAN}-d")], B3_TRACE, "1"),
    ("single deferred", [("b3", f"{B3_TRACE}-{B3_SPAN}")], B3_TRACE, "1"),
    (
        "single 64-bit trace id",
        [("B3", f"{B3_TRACE[16:]}-{B3_SPAN}-1")],
        "0" * 16 + B3_TRACE[16:],
        "1",
    ),
    ("single sampling only", [("b3", "1")], None, "1"),
    ("single bad sampling", [("b3", f"{B3_TRACE}-{B3_SPAN}-x")], None, "1"),
    ("single zero trace", [("b3", f"{'0' * 32}-{B3_SPAN}-1")], None, "1"),
    ("single short span", [("b3", f"{B3_TRACE}-{B3_SPAN[1:]}-1")], None, "1"),
    ("single bad parent", [("b3", f"{B3_TRACE}-{B3_SPAN}-1-xyz")], None, "1"),
    (
        "single duplicated",
        [("b3", f"{B3_TRACE}-{B3_SPAN}-1"), ("B3", f"{B3_TRACE}-{B3_SPAN}-1")],
        None,
        "1",
    ),
    (
        "multiple",
        [("X-B3-TraceId", B3_TRACE), ("X-B3-SpanId", B3_SPAN), ("X-B3-Sampled", "1")],
        B3_TRACE,
        "1",
    ),
    (
        "multiple with parent and flags",
        [
            ("x-b3-traceid", B3_TRACE),
            ("x-b3-spanid", B3_SPAN),
            ("x-b3-parentspanid", B3_PARENT),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ],
        B3_TRACE,
        "1",
    ),
    (
        "multiple not sampled",
        [("X-B3-TRACEID", B3_TRACE), ("X-B3-SPANID", B3_SPAN), ("X-B3-Sampled", "0")],
        B3_TRACE,
        "0",
    ),
    (
        "multiple legacy true",
        [("X-B3-TraceId", B3_TRACE), ("X-B3-SpanId", B3_SPAN), ("X-B3-Sampled", "true")],
        B3_TRACE,
        "1",
    ),
    ("multiple without span id", [("X-B3-TraceId", B3_TRACE)], None, "1"),
    (
        "multiple bad sampled",
        [("X-B3-TraceId", B3_TRACE), ("X-B3-SpanId", B3_SPAN), ("X-B3-Sampled", "2")],
        None,
        "1",
    ),
    (
        "multiple bad trace id",
        [("X-B3-TraceId", B3_TRACE[:-1] + "g"), ("X-B3-SpanId", B3_SPAN)],
        None,
        "1",
    ),
    (
        "single wins over multiple",
        [
            ("b3", f"{B3_TRACE}-{B3_SPAN}-1"),
            ("X-B3-TraceId", "1" * 32),
            ("X-B3-SpanId", "2" * 16),
        ],
        B3_TRACE,
        "1",
    ),
]


@pytest.mark.parametrize("multiple", [False, True], ids=["emit single", "emit multiple"])
@pytest.mark.parametrize(
    ("headers", "kept", "sampled"),
    [pytest.param(h, k, s, id=name) for name, h, k, s in B3_CASES],
)
def test_b3_round_trip(
    provider: TracerProvider,
    headers: list[tuple[str, str]],
    kept: str | None,
    sampled: str,
    multiple: bool,
) -> None:
    outgoing = hop(provider, headers, B3Propagator(multiple=multiple))
    if multiple:
        assert set(outgoing) == {"x-b3-traceid", "x-b3-spanid", "x-b3-sampled"}
        out_trace, out_span = outgoing["x-b3-traceid"], outgoing["x-b3-spanid"]
        out_sampled = outgoing["x-b3-sampled"]
    else:
        assert set(outgoing) == {"b3"}
        out_trace, out_span, out_sampled = outgoing["b3"].split("-")
    assert len(out_trace) == 32
    assert len(out_span) == 16
    assert out_span != B3_SPAN
    if kept is None:
        assert out_trace not in (B3_TRACE, "0" * 32)
    else:
        assert out_trace == kept
        # This provider's sampler follows its parent, so the decision travels on.
        assert out_sampled == sampled


def _flags(headers: Sequence[tuple[str, str]], propagator: B3Propagator) -> int:
    from opentelemetry import trace

    context = extract(headers, propagator=propagator)
    return int(trace.get_current_span(context).get_span_context().trace_flags)


@pytest.mark.parametrize(
    ("headers", "sampled"),
    [pytest.param(h, s, id=name) for name, h, k, s in B3_CASES if k is not None],
)
def test_b3_sampling_decision_is_read(headers: list[tuple[str, str]], sampled: str) -> None:
    assert _flags(headers, B3Propagator()) == int(sampled)


# -- several formats ---------------------------------------------------------------------


def test_configured_formats_are_all_written(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREWORK_PROPAGATORS", "tracecontext,b3multi")
    outgoing = hop(provider, [("traceparent", VALID)], build_propagation())
    assert trace_id(outgoing) == TRACE
    assert outgoing["x-b3-traceid"] == TRACE
    assert outgoing["x-b3-spanid"] == parent_id(outgoing)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [("traceparent", VALID), ("b3", f"{B3_TRACE}-{B3_SPAN}-1")],
            TRACE,
            id="traceparent first",
        ),
        pytest.param(
            [("traceparent", f"ff-{TRACE}-{PARENT}-01"), ("b3", f"{B3_TRACE}-{B3_SPAN}-1")],
            B3_TRACE,
            id="bad traceparent: B3 fills in",
        ),
        pytest.param([("b3", f"{B3_TRACE}-{B3_SPAN}-1")], B3_TRACE, id="B3 only"),
    ],
)
def test_the_first_valid_format_wins(
    provider: TracerProvider, headers: list[tuple[str, str]], expected: str
) -> None:
    outgoing = hop(provider, headers, build_propagation("tracecontext,b3"))
    assert trace_id(outgoing) == expected
    assert outgoing["b3"].startswith(expected)


@pytest.mark.parametrize("names", ["jaeger", "tracecontext,xray", " , "])
def test_unknown_propagator_names_are_refused(names: str) -> None:
    with pytest.raises(ConfigurationError, match="propagator"):
        build_propagation(names)


def test_tracestate_can_be_kept_inside(provider: TracerProvider) -> None:
    inside = TraceContextPropagator(forward_tracestate=False)
    outgoing = hop(provider, [("traceparent", VALID), ("tracestate", "a=1")], inside)
    assert trace_id(outgoing) == TRACE
    assert "tracestate" not in outgoing


def test_multi_valued_header_mappings_give_every_value(provider: TracerProvider) -> None:
    """aiohttp's and Starlette's headers return only the first value from ``get``."""
    from multidict import CIMultiDict

    split = CIMultiDict([("traceparent", VALID), ("tracestate", "a=1"), ("TraceState", "b=2")])
    assert tracestate(hop(provider, split)) == {"a": "1", "b": "2"}
    repeated = CIMultiDict([("traceparent", VALID), ("traceparent", VALID)])
    assert trace_id(hop(provider, repeated)) != TRACE
