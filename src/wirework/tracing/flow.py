"""A choreographed flow rebuilt from the span store: who published what, who handled it.

Every message of one correlation id has a publish span (PRODUCER) and a
consume span (CONSUMER) per attempt of each group that handled it; both carry
the message id, its type, its topic and its causation id. ``build_flow`` turns
those spans into a causation tree, without I/O:

* a root is a message with no cause (the first event of the flow); when its
  publish span has an HTTP or gRPC server span above it, that call is shown as
  the flow's trigger;
* under each message, each consumer that handled it, its attempts collapsed
  into one line (the count, the final outcome, the last error);
* under each consumer, the messages its handler published (their causation
  id is the handled message's id); a caused message that cannot be tied to
  one consumer hangs under the message itself;
* a message whose cause left no span (sampled out, still in flight, pruned)
  is listed beside the roots, marked as such.

``load_flow(store, correlation_id)`` reads the spans and builds the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from wirework.tracing.messaging import (
    ATTEMPT_ATTRIBUTE,
    CAUSATION_ATTRIBUTE,
    DEAD_LETTERED_ATTRIBUTE,
    HANDLER_ATTRIBUTE,
    OUTCOME_ATTRIBUTE,
)
from wirework.tracing.saga_spans import SAGA_NAME_ATTRIBUTE, STEP_ATTRIBUTE
from wirework.tracing.span_store import SpanRecord, SpanStore

MESSAGE_ID = "messaging.message.id"
EVENT_TYPE = "cloudevents.event_type"
DESTINATION = "messaging.destination.name"
GROUP = "messaging.consumer.group.name"
#: The type of a responder's error reply (``wirework.service.requests.ERROR_EVENT_TYPE``).
ERROR_REPLY_TYPE = "wirework.error"

#: Traces read for the span that started a flow (its roots' publish spans' traces).
MAX_TRIGGER_TRACES = 10

#: Handling outcomes that end a message's handling in failure.
FAILED = frozenset({"dead_lettered", "rejected", "error_reply"})
#: Handling outcomes after which the broker delivers the message again.
PENDING = frozenset({"retrying", "cancelled"})


class Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Trigger(Model):
    """The span that published a root message from outside any handler: an HTTP or
    gRPC call when there is one above it, else the topmost span found."""

    service: str
    name: str
    kind: str
    start: float
    """Seconds from the flow's start."""
    duration: float
    error: str | None = None


class Attempt(Model):
    """One delivery of a message to one consumer (one consume span)."""

    attempt: int
    outcome: str | None
    start: float
    """Seconds from the flow's start."""
    duration: float
    error: str | None = None
    trace_id: str
    span_id: str


class Handling(Model):
    """One consumer (service, group, handler) handling one message, all attempts in one.

    ``outcome`` is ``success``, ``dead_lettered`` (gave up after the last
    attempt), ``rejected`` (dead-lettered at once), ``error_reply`` (a responder
    answered with an error), ``retrying`` (the last recorded attempt failed and
    another is due) or ``cancelled`` (stopped mid-way; the message comes back).
    """

    service: str
    group: str | None
    handler: str | None
    outcome: str
    attempts: int
    start: float
    """Seconds from the flow's start to the first recorded attempt."""
    duration: float
    """Seconds the last attempt took."""
    error: str | None = None
    """The last failed attempt's error."""
    attempt_list: list[Attempt]
    children: list[Message] = []
    """The messages this handler published."""


class Message(Model):
    """One message of the flow, its consumers, and what it caused."""

    id: str
    type: str | None
    topic: str | None
    causation_id: str | None
    publisher: str | None
    """The publishing service; None when the publish span was not recorded."""
    published: float | None
    """Seconds from the flow's start to the publish."""
    publish_error: str | None = None
    request: bool = False
    reply: bool = False
    cause_recorded: bool = True
    """False for a message whose cause is named but left no span."""
    trigger: Trigger | None = None
    via: str | None = None
    """The saga step that published it (``saga fulfilment · reserve``), when one did:
    a step runs later than the handler that started its saga, under that handler."""
    handlings: list[Handling] = []
    children: list[Message] = []
    """Caused messages that could not be tied to one of ``handlings``."""


class Flow(Model):
    """The causation tree of one correlation id."""

    correlation_id: str
    start: datetime
    duration: float
    """Seconds from the first span's start to the last span's end."""
    status: str
    """``failed`` (a message dead-lettered, rejected or answered with an error, or a
    publish failed), ``pending`` (a retry is due) or ``ok``."""
    services: list[str]
    messages: int
    roots: list[Message]
    orphans: list[Message]
    """Messages whose cause was not recorded."""

    def walk(self) -> Iterable[Message]:
        """Every message of the tree, depth first."""
        stack = list(reversed([*self.roots, *self.orphans]))
        while stack:
            message = stack.pop()
            yield message
            below = [c for h in message.handlings for c in h.children] + message.children
            stack.extend(reversed(below))


Handling.model_rebuild()


class FlowSummary(Model):
    """One flow in a list."""

    correlation_id: str
    root: str
    messages: int
    status: str
    start: datetime
    duration: float


def summarize_flow(flow: Flow) -> FlowSummary:
    """The flow's line in a list: its first root (the call that started it, or its type)."""
    first = next(iter([*flow.roots, *flow.orphans]), None)
    if first is None:
        root = "?"
    elif first.trigger is not None:
        root = f"{first.trigger.service}: {first.trigger.name}"
    else:
        root = first.type or first.id
    return FlowSummary(
        correlation_id=flow.correlation_id,
        root=root,
        messages=flow.messages,
        status=flow.status,
        start=flow.start,
        duration=flow.duration,
    )


def load_flow(store: SpanStore, correlation_id: str) -> Flow | None:
    """The flow of ``correlation_id`` (exact) from ``store``; None when it has no span."""
    spans = store.correlated(correlation_id)
    if not spans:
        return None
    known = {(s.trace_id, s.span_id) for s in spans}
    # Where a root was published from (an HTTP handler, say) lies in its trace,
    # in spans that carry no correlation id.
    traces = {
        s.trace_id
        for s in spans
        if s.kind == "PRODUCER"
        and CAUSATION_ATTRIBUTE not in s.attributes
        and s.parent_id is not None
        and (s.trace_id, s.parent_id) not in known
    }
    context = [
        span for trace_id in sorted(traces)[:MAX_TRIGGER_TRACES] for span in store.spans(trace_id)
    ]
    return build_flow(spans, correlation_id=correlation_id, context=context)


def build_flow(
    spans: Sequence[SpanRecord],
    *,
    correlation_id: str,
    context: Sequence[SpanRecord] = (),
) -> Flow:
    """The causation tree of one correlation id's spans (at least one).

    Args:
        spans: the spans carrying the correlation id, in any order.
        correlation_id: the id, as shown.
        context: other spans of the same traces (no correlation id), searched for
            the call that published a root message.
    """
    published: dict[str, list[SpanRecord]] = {}
    consumed: dict[str, list[SpanRecord]] = {}
    used: list[SpanRecord] = []
    for span in sorted(spans, key=_start):
        message_id = span.attributes.get(MESSAGE_ID)
        if message_id is None or span.kind not in ("PRODUCER", "CONSUMER"):
            continue
        kept = published if span.kind == "PRODUCER" else consumed
        kept.setdefault(str(message_id), []).append(span)
        used.append(span)
    # Ids in order of their first span; a message's cause is named by any of its spans.
    ids = list(dict.fromkeys(str(s.attributes[MESSAGE_ID]) for s in used))
    causes: dict[str, str | None] = {}
    for message_id in ids:
        named = (
            s.attributes[CAUSATION_ATTRIBUTE]
            for s in (*published.get(message_id, ()), *consumed.get(message_id, ()))
            if CAUSATION_ATTRIBUTE in s.attributes
        )
        cause = next(named, None)
        causes[message_id] = None if cause is None else str(cause)
    by_span = {(s.trace_id, s.span_id): s for s in (*context, *spans)}
    triggers: dict[str, SpanRecord] = {}
    for message_id, sent in published.items():
        found = _trigger(sent[0], by_span) if causes[message_id] is None else None
        if found is not None:
            triggers[message_id] = found
            used.append(found)
    origin = min(s.start_ns for s in used or spans)
    end = max(s.end_ns for s in used or spans)

    def offset(ns: int) -> float:
        return (ns - origin) / 1e9

    # Which handling published each message: its publish span's parent is one
    # of the handling's consume spans, else the one handling of the cause in the
    # publisher's service that was running at the time.
    handled_by: dict[str, tuple[str, int]] = {}
    groups = {message_id: _handlings(consumed.get(message_id, [])) for message_id in ids}
    for message_id in ids:
        cause = causes[message_id]
        if cause is None or cause not in groups or message_id not in published:
            continue
        index = _publisher(published[message_id][0], groups[cause], by_span)
        if index is not None:
            handled_by[message_id] = (cause, index)

    children: dict[tuple[str, int | None], list[str]] = {}
    for message_id in ids:
        cause = causes[message_id]
        if cause is not None and cause in groups:
            parent = handled_by.get(message_id, (cause, None))
            children.setdefault((parent[0], parent[1]), []).append(message_id)

    placed: set[str] = set()

    def below(key: tuple[str, int | None]) -> list[Message]:
        return [node(c) for c in children.get(key, []) if c not in placed]

    def node(message_id: str, *, orphan: bool = False) -> Message:
        placed.add(message_id)
        sent = published.get(message_id, [])
        first = sent[0] if sent else None
        attributes: dict[str, Any] = {}
        for span in reversed(sent + consumed.get(message_id, [])):
            attributes.update(span.attributes)
        handlings = [
            _handling(attempts, offset, below((message_id, index)))
            for index, attempts in enumerate(groups[message_id])
        ]
        trigger = triggers.get(message_id)
        return Message(
            id=message_id,
            type=_str(attributes.get(EVENT_TYPE)),
            topic=_str(attributes.get(DESTINATION)) if first is None else _topic(first),
            causation_id=causes[message_id],
            publisher=None if first is None else first.service,
            published=None if first is None else offset(first.start_ns),
            publish_error=None if first is None else _publish_error(first),
            request=bool(attributes.get("wirework.request")),
            reply=first is not None and _reply(first),
            cause_recorded=not orphan,
            trigger=None if trigger is None else _as_trigger(trigger, offset),
            via=None if first is None else _saga_step(first, by_span),
            handlings=handlings,
            children=below((message_id, None)),
        )

    roots = [node(i) for i in ids if causes[i] is None and i not in placed]
    # A cause named but without spans; then, defensively, whatever a cycle of causes left.
    orphans = [node(i, orphan=True) for i in ids if causes[i] not in groups and i not in placed]
    orphans += [node(i, orphan=True) for i in ids if i not in placed]

    flow_services: list[str] = []
    for span in sorted(used or spans, key=_start):
        if span.service not in flow_services:
            flow_services.append(span.service)
    tree = [*roots, *orphans]
    return Flow(
        correlation_id=correlation_id,
        start=datetime.fromtimestamp(origin / 1e9, UTC),
        duration=max(0, end - origin) / 1e9,
        status=_status(tree),
        services=flow_services,
        messages=len(ids),
        roots=roots,
        orphans=orphans,
    )


def _start(span: SpanRecord) -> int:
    return span.start_ns


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _error(span: SpanRecord) -> str | None:
    return (span.status_message or "error") if span.error else None


def _publish_error(publish: SpanRecord) -> str | None:
    if publish.attributes.get(EVENT_TYPE) == ERROR_REPLY_TYPE and publish.status_message == (
        "error reply"
    ):
        return None  # sent as it should be: the responder's handling says what failed
    return _error(publish)


def _reply(publish: SpanRecord) -> bool:
    return bool(publish.attributes.get("messaging.destination.temporary"))


def _topic(publish: SpanRecord) -> str | None:
    if _reply(publish):
        return None  # a reply inbox's address says nothing to a reader
    return _str(publish.attributes.get(DESTINATION))


def _trigger(publish: SpanRecord, by_span: dict[tuple[str, str], SpanRecord]) -> SpanRecord | None:
    """The nearest server span above ``publish``, else the topmost span above it."""
    top: SpanRecord | None = None
    parent = publish.parent_id
    seen: set[str] = set()
    while parent is not None and parent not in seen:
        seen.add(parent)
        span = by_span.get((publish.trace_id, parent))
        if span is None:
            break
        if span.kind == "CONSUMER":
            return None  # published by a handler: a message of some flow caused it
        if span.kind == "SERVER":
            return span
        top = span
        parent = span.parent_id
    return top


Offset = Callable[[int], float]
SpanIndex = Mapping[tuple[str, str], SpanRecord]


def _as_trigger(span: SpanRecord, offset: Offset) -> Trigger:
    return Trigger(
        service=span.service,
        name=span.name,
        kind=span.kind,
        start=offset(span.start_ns),
        duration=span.duration,
        error=_error(span),
    )


def _handlings(spans: Sequence[SpanRecord]) -> list[list[SpanRecord]]:
    """Consume spans grouped by (service, group, handler), each group in time order.

    Time, not the attempt number: a dead letter replayed starts again at attempt 1.
    """
    grouped: dict[tuple[str, Any, Any], list[SpanRecord]] = {}
    for span in sorted(spans, key=_start):
        key = (span.service, span.attributes.get(GROUP), span.attributes.get(HANDLER_ATTRIBUTE))
        grouped.setdefault(key, []).append(span)
    return list(grouped.values())


def _attempt(span: SpanRecord) -> int:
    value = span.attributes.get(ATTEMPT_ATTRIBUTE)
    return value if isinstance(value, int) else 1


def _ancestors(span: SpanRecord, by_span: SpanIndex) -> Iterable[SpanRecord]:
    """The spans above ``span`` that are known, nearest first, up to the first consumer."""
    parent, seen = span.parent_id, set()
    while parent is not None and parent not in seen:
        seen.add(parent)
        above = by_span.get((span.trace_id, parent))
        if above is None:
            return
        yield above
        if above.kind == "CONSUMER":
            return
        parent = above.parent_id


def _saga_step(publish: SpanRecord, by_span: SpanIndex) -> str | None:
    for above in _ancestors(publish, by_span):
        step = above.attributes.get(STEP_ATTRIBUTE)
        if above.kind == "INTERNAL" and step is not None:
            return f"saga {above.attributes.get(SAGA_NAME_ATTRIBUTE, '?')} · {step}"
    return None


def _publisher(
    publish: SpanRecord, handlings: list[list[SpanRecord]], by_span: SpanIndex
) -> int | None:
    # The consume span above the publish: its parent, or above the spans between
    # (a saga step's, run later under the handler that started the saga).
    consumer = next((s for s in _ancestors(publish, by_span) if s.kind == "CONSUMER"), None)
    above = {publish.parent_id} if consumer is None else {publish.parent_id, consumer.span_id}
    for index, attempts in enumerate(handlings):
        if any(a.span_id in above and a.trace_id == publish.trace_id for a in attempts):
            return index
    running = [
        index
        for index, attempts in enumerate(handlings)
        if attempts[0].service == publish.service
        and any(a.start_ns <= publish.start_ns <= a.end_ns for a in attempts)
    ]
    return running[0] if len(running) == 1 else None


def _outcome(span: SpanRecord) -> str:
    outcome = span.attributes.get(OUTCOME_ATTRIBUTE)
    if outcome == "success" or (outcome is None and not span.error):
        return "success"
    if outcome == "rejected":
        return "rejected"
    if span.attributes.get(DEAD_LETTERED_ATTRIBUTE):
        return "dead_lettered"
    if outcome in ("error_reply", "cancelled"):
        return str(outcome)
    return "retrying"


def _handling(attempts: list[SpanRecord], offset: Offset, children: list[Message]) -> Handling:
    last = attempts[-1]
    failures = [a for a in attempts if a.error]
    handler = last.attributes.get(HANDLER_ATTRIBUTE)
    return Handling(
        service=last.service,
        group=_str(last.attributes.get(GROUP)),
        handler=None if handler is None else str(handler),
        outcome=_outcome(last),
        # Earlier attempts may be missing (sampled out); the last one says how many there were.
        attempts=max(len(attempts), *(_attempt(a) for a in attempts)),
        start=offset(attempts[0].start_ns),
        duration=last.duration,
        error=_error(failures[-1]) if failures else None,
        attempt_list=[
            Attempt(
                attempt=_attempt(a),
                outcome=_str(a.attributes.get(OUTCOME_ATTRIBUTE)),
                start=offset(a.start_ns),
                duration=a.duration,
                error=_error(a),
                trace_id=a.trace_id,
                span_id=a.span_id,
            )
            for a in attempts
        ],
        children=children,
    )


def _status(tree: list[Message]) -> str:
    pending = False
    stack = list(tree)
    while stack:
        message = stack.pop()
        if message.publish_error is not None or (
            message.trigger is not None and message.trigger.error is not None
        ):
            return "failed"
        for handling in message.handlings:
            if handling.outcome in FAILED:
                return "failed"
            pending = pending or handling.outcome in PENDING
            stack.extend(handling.children)
        stack.extend(message.children)
    return "pending" if pending else "ok"
