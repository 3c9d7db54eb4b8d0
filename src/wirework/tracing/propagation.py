"""Trace context in and out of carriers: W3C Trace Context level 1, and B3 where configured.

The parsers follow the W3C specification and the cases of its official test
suite (``w3c/trace-context: test/test.py``) to the letter, because the one
thing propagation must never do is fail a request: a traceparent that is
missing, duplicated, malformed, of version ``ff`` or all zeros yields *no*
parent, so the next span starts a new trace (RELIABILITY.md §1.2 lesson 10).
A tracestate is taken only with a valid traceparent and is discarded whole
when any member breaks the grammar, when a key repeats, or past 32 members.
Going out, each call carries the current span as parent (a new parent id per
call) and at most 512 characters of tracestate, truncated the W3C way.

The propagators are OpenTelemetry ``TextMapPropagator``-s, so the context they
produce is the SDK's own ``Context``; header names are matched without regard
to case on any carrier (HTTP headers, gRPC metadata, envelope fields).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState

from wirework.errors import ConfigurationError

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3_SINGLE = "b3"
B3_TRACE_ID = "x-b3-traceid"
B3_SPAN_ID = "x-b3-spanid"
B3_PARENT_SPAN_ID = "x-b3-parentspanid"
B3_SAMPLED = "x-b3-sampled"
B3_FLAGS = "x-b3-flags"

#: Members a tracestate may hold (W3C §3.3.1.1); one more and it is discarded.
MAX_TRACESTATE_MEMBERS = 32
#: Characters of tracestate sent on: the W3C minimum every vendor must propagate.
MAX_TRACESTATE_CHARS = 512
#: Members longer than this are the first to go when a tracestate is truncated.
TRACESTATE_LARGE_MEMBER = 128
#: Longest tracestate read at all: 32 members of the longest key and value, with
#: commas. Anything longer cannot be valid, so it is not even parsed.
MAX_TRACESTATE_INPUT = MAX_TRACESTATE_MEMBERS * (256 + 1 + 256) + MAX_TRACESTATE_MEMBERS - 1
#: Longest traceparent read: a future version may append fields, within reason.
MAX_TRACEPARENT_INPUT = 512

_OWS = " \t"
_HEX_LOWER = frozenset("0123456789abcdef")
_KEY = re.compile(
    r"[a-z][_0-9a-z\-*/]{0,255}"
    r"|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
)
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
#: The common case, a version-00 traceparent, in one match (the rules below, at C speed).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_B3_SAMPLING = {"0": False, "1": True, "d": True}
_B3_MULTI_SAMPLED = {"0": False, "1": True, "false": False, "true": True}
#: Trace flags by the sampled bit, the only one a parsed ``traceparent`` passes on.
_FLAGS = (TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.SAMPLED))

Carrier = Mapping[str, str] | Mapping[str, Sequence[str]] | Iterable[tuple[str, str]]
"""What ``extract`` reads: a mapping (one or several values per name) or name-value
pairs with repeats (``request.headers.raw``, gRPC ``invocation_metadata()``)."""


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in _HEX_LOWER for c in text)


def _values(carrier: Any, getter: Getter[Any], name: str) -> list[str]:
    """Every value of header ``name`` in ``carrier``, whatever the case of its name."""
    found: list[str] = []
    try:
        keys = getter.keys(carrier)
    except Exception:
        keys = [name]
    for key in keys:
        if isinstance(key, str) and key.lower() == name:
            try:
                values = getter.get(carrier, key)
            except Exception:
                values = None
            found.extend(v for v in values or () if isinstance(v, str))
    return found


def _one(carrier: Any, getter: Getter[Any], name: str) -> str | None:
    """The single value of ``name``; None when absent or repeated (a repeat is not trusted)."""
    values = _values(carrier, getter, name)
    return values[0] if len(values) == 1 else None


# -- W3C Trace Context ----------------------------------------------------------------


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote parent in a ``traceparent`` value, or None when the trace must restart.

    Version ``00`` is exactly 55 characters; a higher version (not ``ff``) is
    read by the version-00 layout and anything after a ``-`` at position 55
    is ignored, as the specification asks of forward compatibility.
    """
    value = value.strip(_OWS)
    common = _TRACEPARENT_00.fullmatch(value)
    if common is not None:
        trace_id, span_id, flags = common.groups()
        if trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        # Every message delivered comes through here: the tuple a SpanContext is, made
        # without its range checks (32 and 16 hex digits, not all zero, are in range)
        # and with the flags made once: 0.3 us instead of 1.3 us.
        return tuple.__new__(
            SpanContext,
            (
                int(trace_id, 16),
                int(span_id, 16),
                True,
                _FLAGS[int(flags, 16) & TraceFlags.SAMPLED],
                DEFAULT_TRACE_STATE,
                True,
            ),
        )
    if len(value) < 55 or len(value) > MAX_TRACEPARENT_INPUT:
        return None
    version = value[:2]
    if not _is_hex(version) or version == "ff":
        return None
    if (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id) and _is_hex(span_id) and _is_hex(flags)):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        # Only the sampled bit means anything in level 1; other bits are not passed on.
        trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED),
    )


def parse_tracestate(values: Sequence[str]) -> TraceState | None:
    """The tracestate in one or more header values, or None if it must be discarded.

    Empty values and empty members are allowed and skipped; a member that breaks
    the key or value grammar, a repeated key or a 33rd member discards it all.
    """
    combined = ",".join(values)
    if len(combined) > MAX_TRACESTATE_INPUT:
        return None
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in combined.split(","):
        member = raw.strip(_OWS)
        if not member:
            continue
        key, equals, value = member.partition("=")
        if not equals or key in seen or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            return None
        seen.add(key)
        entries.append((key, value))
        if len(entries) > MAX_TRACESTATE_MEMBERS:
            return None
    return TraceState(entries) if entries else None


def remote_parent(traceparent: str, tracestate: Callable[[], Sequence[str]]) -> SpanContext | None:
    """The parent a ``traceparent`` names, with its tracestate, or None (restart the trace).

    ``tracestate`` gives the tracestate values; it is called only for a valid
    traceparent, since the specification forbids reading one without it.
    """
    parent = parse_traceparent(traceparent)
    if parent is None:
        return None
    values = tracestate()
    if not values:
        return parent  # the usual case: nothing to parse
    state = parse_tracestate(values)
    if state is None:
        return parent
    return SpanContext(
        trace_id=parent.trace_id,
        span_id=parent.span_id,
        is_remote=True,
        trace_flags=parent.trace_flags,
        trace_state=state,
    )


def format_tracestate(state: TraceState, *, limit: int = MAX_TRACESTATE_CHARS) -> str:
    """``state`` as a header value of at most ``limit`` characters.

    When it is too long, members over 128 characters go first (rightmost
    first), then members from the right, as W3C §3.3.1.5 describes.
    """
    members = [f"{key}={value}" for key, value in state.items()]

    def length() -> int:
        return sum(map(len, members)) + max(0, len(members) - 1)

    for index in range(len(members) - 1, -1, -1):
        if length() <= limit:
            break
        if len(members[index]) > TRACESTATE_LARGE_MEMBER:
            del members[index]
    while members and length() > limit:
        members.pop()
    return ",".join(members)


def format_traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags & 0x01:02x}"


class TraceContextPropagator(TextMapPropagator):
    """W3C ``traceparent``/``tracestate``, read exactly as the W3C test suite expects.

    Args:
        forward_tracestate: send the tracestate on (False for calls leaving the
            system: a tracestate may hold what other vendors put there).
    """

    def __init__(self, *, forward_tracestate: bool = True) -> None:
        self.forward_tracestate = forward_tracestate

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        base = context if context is not None else Context()
        raw = _one(carrier, getter, TRACEPARENT)
        if raw is None:
            return base
        parent = remote_parent(raw, lambda: _values(carrier, getter, TRACESTATE))
        if parent is None:
            return base
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), base)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return
        setter.set(carrier, TRACEPARENT, format_traceparent(span_context))
        if self.forward_tracestate and span_context.trace_state:
            state = format_tracestate(span_context.trace_state)
            if state:
                setter.set(carrier, TRACESTATE, state)

    @property
    def fields(self) -> set[str]:
        return {TRACEPARENT, TRACESTATE}


# -- B3 -----------------------------------------------------------------------------------


def _b3_ids(trace_id: str, span_id: str) -> tuple[int, int] | None:
    if len(trace_id) not in (16, 32) or len(span_id) != 16:
        return None
    if not (_is_hex(trace_id) and _is_hex(span_id)):
        return None
    trace_number, span_number = int(trace_id, 16), int(span_id, 16)
    if trace_number == 0 or span_number == 0:
        return None
    return trace_number, span_number  # a 64-bit trace id is the low half of a 128-bit one


def parse_b3_single(value: str) -> SpanContext | None:
    """The parent in a ``b3`` value (``trace-span[-sampling[-parent]]``), or None.

    A sampling decision alone (``b3: 1``) carries no parent: the trace restarts.
    """
    parts = value.strip(_OWS).split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    ids = _b3_ids(parts[0], parts[1])
    if ids is None:
        return None
    sampled = True  # absent: the decision is deferred to us
    if len(parts) >= 3:
        if parts[2] not in _B3_SAMPLING:
            return None
        sampled = _B3_SAMPLING[parts[2]]
    if len(parts) == 4 and (len(parts[3]) != 16 or not _is_hex(parts[3])):
        return None
    return _remote(ids, sampled)


def _remote(ids: tuple[int, int], sampled: bool) -> SpanContext:
    return SpanContext(
        trace_id=ids[0],
        span_id=ids[1],
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )


class B3Propagator(TextMapPropagator):
    """Zipkin's B3, read from the single ``b3`` header or the ``X-B3-*`` headers.

    Both forms are accepted (``b3`` wins when both are present); ``multiple``
    chooses which form is written.
    """

    def __init__(self, *, multiple: bool = False) -> None:
        self.multiple = multiple

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        base = context if context is not None else Context()
        single = _one(carrier, getter, B3_SINGLE)
        parent = parse_b3_single(single) if single is not None else None
        if parent is None:
            parent = self._extract_multiple(carrier, getter)
        if parent is None:
            return base
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), base)

    @staticmethod
    def _extract_multiple(carrier: Any, getter: Getter[Any]) -> SpanContext | None:
        trace_id = _one(carrier, getter, B3_TRACE_ID)
        span_id = _one(carrier, getter, B3_SPAN_ID)
        if trace_id is None or span_id is None:
            return None
        ids = _b3_ids(trace_id.strip(_OWS), span_id.strip(_OWS))
        if ids is None:
            return None
        parent_id = _one(carrier, getter, B3_PARENT_SPAN_ID)
        if parent_id is not None and not (
            len(parent_id.strip(_OWS)) == 16 and _is_hex(parent_id.strip(_OWS))
        ):
            return None
        sampled = True
        raw_sampled = _one(carrier, getter, B3_SAMPLED)
        if raw_sampled is not None:
            decision = _B3_MULTI_SAMPLED.get(raw_sampled.strip(_OWS).lower())
            if decision is None:
                return None
            sampled = decision
        if (_one(carrier, getter, B3_FLAGS) or "").strip(_OWS) == "1":
            sampled = True  # debug implies sampled
        return _remote(ids, sampled)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return
        trace_id = f"{span_context.trace_id:032x}"
        span_id = f"{span_context.span_id:016x}"
        sampled = "1" if span_context.trace_flags.sampled else "0"
        if self.multiple:
            setter.set(carrier, B3_TRACE_ID, trace_id)
            setter.set(carrier, B3_SPAN_ID, span_id)
            setter.set(carrier, B3_SAMPLED, sampled)
        else:
            setter.set(carrier, B3_SINGLE, f"{trace_id}-{span_id}-{sampled}")

    @property
    def fields(self) -> set[str]:
        if self.multiple:
            return {B3_TRACE_ID, B3_SPAN_ID, B3_SAMPLED}
        return {B3_SINGLE}


# -- several at once, configured by name ------------------------------------------------


class Propagation(TextMapPropagator):
    """Several formats together: the first that finds a valid parent wins; all are written.

    Unlike OpenTelemetry's ``CompositePropagator`` (where the last valid format
    overwrites the others), the order is a priority: with ``tracecontext,b3`` a
    valid ``traceparent`` is used and B3 only fills in when it is missing or bad.
    """

    def __init__(self, propagators: Sequence[TextMapPropagator]) -> None:
        self.propagators = tuple(propagators)

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        base = context if context is not None else Context()
        for propagator in self.propagators:
            found = propagator.extract(carrier, base, getter)
            if found is not base and trace.get_current_span(found).get_span_context().is_valid:
                return found
        return base

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        for propagator in self.propagators:
            propagator.inject(carrier, context, setter)

    @property
    def fields(self) -> set[str]:
        return set().union(*(p.fields for p in self.propagators))


PROPAGATOR_NAMES = ("tracecontext", "b3", "b3multi")
"""``WIREWORK_PROPAGATORS`` names, as OpenTelemetry's ``OTEL_PROPAGATORS`` spells them:
``b3`` writes the single header, ``b3multi`` the ``X-B3-*`` headers (both read both)."""


def build_propagation(names: Iterable[str] | str | None = None) -> Propagation:
    """A ``Propagation`` of the named formats; None reads ``WIREWORK_PROPAGATORS``
    (default ``tracecontext``).

    Raises:
        ConfigurationError: an unknown name.
    """
    if names is None:
        names = os.environ.get("WIREWORK_PROPAGATORS") or "tracecontext"
    if isinstance(names, str):
        names = names.split(",")
    made: list[TextMapPropagator] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "tracecontext":
            made.append(TraceContextPropagator())
        elif name in ("b3", "b3multi"):
            made.append(B3Propagator(multiple=name == "b3multi"))
        else:
            raise ConfigurationError(
                f"unknown trace propagator {raw.strip()!r} (in WIREWORK_PROPAGATORS or "
                f"propagators=...); use a comma-separated list of {', '.join(PROPAGATOR_NAMES)}"
            )
    if not made:
        raise ConfigurationError(
            f"no trace propagator named; use one or more of {', '.join(PROPAGATOR_NAMES)}"
        )
    return Propagation(made)


_current: Propagation | None = None


def propagation() -> Propagation:
    """The process's propagation: set by ``configure_tracing``, else from the environment."""
    global _current
    if _current is None:
        _current = build_propagation()
    return _current


def use_propagation(value: Propagation | None) -> Propagation | None:
    """Make ``value`` the process's propagation (None: read the environment again);
    returns the one it replaced."""
    global _current
    previous, _current = _current, value
    return previous


def _as_mapping(carrier: Carrier) -> dict[str, list[str]]:
    """Every header value by lowercase name, repeats kept.

    ``items()`` is read rather than ``get``: multi-valued header mappings
    (aiohttp's, Starlette's) return only the first value from ``get``, and
    both repeats and split tracestate headers matter here.
    """
    grouped: dict[str, list[str]] = {}
    try:
        pairs: Iterable[Any] = carrier.items() if isinstance(carrier, Mapping) else carrier
        for pair in pairs:
            try:
                name, value = pair
            except (TypeError, ValueError):
                continue
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if not isinstance(name, str):
                continue
            values = value if isinstance(value, list | tuple) else [value]
            for one in values:
                if isinstance(one, bytes):
                    one = one.decode("latin-1")
                if isinstance(one, str):
                    grouped.setdefault(name.lower(), []).append(one)
    except TypeError:
        return {}  # not iterable at all
    return grouped


def extract(
    carrier: Carrier,
    *,
    context: Context | None = None,
    propagator: TextMapPropagator | None = None,
) -> Context:
    """The context a request or message arrived with (no parent: a new trace starts).

    ``carrier`` may be any mapping or a sequence of name-value pairs (str or
    bytes, repeats kept); names match in any case. Never raises on bad input.
    """
    source = _as_mapping(carrier)
    base = context if context is not None else Context()
    try:
        return (propagator or propagation()).extract(source, base)
    except Exception:
        return base  # a broken third-party propagator must not fail the request either


def inject(
    carrier: MutableMapping[str, str],
    *,
    context: Context | None = None,
    propagator: TextMapPropagator | None = None,
) -> MutableMapping[str, str]:
    """Write the current span (or ``context``'s) into ``carrier`` with lowercase names;
    returns ``carrier``."""
    (propagator or propagation()).inject(carrier, context)
    return carrier
