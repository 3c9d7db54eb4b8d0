"""Pure helpers of the RabbitMQ backend: server-side names, delay buckets, partitions, headers.

Nothing here does I/O, so the mapping of the wirework model onto RabbitMQ
objects can be read (and tested) in one place:

* every name starts with the namespace and uses ``:`` as its separator, which
  topic, group and namespace names cannot contain (``[A-Za-z0-9._-]``), so two
  (topic, group) pairs never map to one queue; a name over AMQP's 255 bytes
  keeps its readable start and ends in a digest of the whole;
* a delay is rounded *up* to one of a fixed, geometric set of queue TTLs
  (four per doubling, from 10 ms), so a message is never early and at most
  19 % late, and only a bounded number of delay queues can exist;
* a key picks its partition by CRC-32, stable across processes and Python
  runs (``hash()`` is salted per process);
* wirework's own per-message state (key, attempts, first failure, last
  error, and the dead-letter record) travels in one reserved header table,
  ``x-wirework``; the user's headers travel as themselves.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from wirework.brokers.base import NAME_PATTERN, DeadLetter, DeadLetterReason, Failure
from wirework.envelope import WireMessage
from wirework.errors import ConfigurationError

#: AMQP short strings (queue, exchange and header names) hold at most 255 bytes.
_MAX_NAME = 255

#: Shortest delay queue TTL; four buckets per doubling above it.
_BUCKET_BASE_MS = 10.0
_BUCKETS_PER_DOUBLING = 4

#: Longest TTL RabbitMQ accepts in ``x-message-ttl`` (2^31 - 1 ms, about 24.8 days).
_MAX_TTL_MS = 2**31 - 1

#: The header holding wirework's per-message state, and the one the delay exchange routes on
#: (without the ``x-`` prefix: a headers exchange ignores ``x-`` headers when it matches).
STATE_HEADER = "x-wirework"
DELAY_HEADER = "wirework-delay-queue"

#: Headers RabbitMQ itself reads or writes: ``CC``/``BCC`` would route extra copies, the rest
#: are added by the broker on dead-lettering, redelivery or stream reads.
_BROKER_HEADERS = frozenset(
    {
        "CC",
        "BCC",
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-stream-offset",
    }
)

#: How every header that is not simply a user's starts: RabbitMQ's ``x-`` ones and ``CC``/``BCC``,
#: wirework's state and its delay-queue header (``split_headers`` tests this first).
_SPECIAL_STARTS = ("x-", "CC", "BCC", DELAY_HEADER)

#: Queue kind of the keyless queue of a group; partitions are ``p0`` .. ``p<n-1>``.
ANY = "any"


def _fit(name: str) -> str:
    """``name`` if it fits AMQP's 255 bytes, else its start plus a digest of the whole."""
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return f"{name[: _MAX_NAME - 34]}~{digest}"


@dataclass(frozen=True)
class Names:
    """Every server-side name of one namespace."""

    namespace: str

    @property
    def catalog(self) -> str:
        """The queue listing what the namespace holds (topics, groups, delay queues)."""
        return _fit(f"{self.namespace}:catalog")

    @property
    def delay_exchange(self) -> str:
        """Headers exchange routing a delayed message to its delay queue by ``DELAY_HEADER``."""
        return _fit(f"{self.namespace}:delay")

    def topic_exchange(self, topic: str) -> str:
        return _fit(f"{self.namespace}:t:{topic}")

    def unrouted_exchange(self, topic: str) -> str:
        """The topic exchange's alternate exchange: what no group queue took goes here."""
        return _fit(f"{self.namespace}:t:{topic}:unrouted")

    def lock(self, topic: str) -> str:
        """An exclusive queue held while a process moves the topic's held messages."""
        return _fit(f"{self.namespace}:t:{topic}:lock")

    def hold(self, topic: str) -> str:
        """Messages published while the topic had no group, kept for the first one."""
        return _fit(f"{self.namespace}:t:{topic}:hold")

    def group_queue(self, topic: str, group: str, kind: str) -> str:
        """The group's keyless queue (``ANY``) or one of its partitions (``p<i>``)."""
        return _fit(f"{self.namespace}:g:{topic}:{group}:{kind}")

    def dead(self, topic: str, group: str) -> str:
        return _fit(f"{self.namespace}:g:{topic}:{group}:dead")

    def bucket(self, topic: str, group: str | None, index: int) -> str:
        """A delay queue: the topic's (publish delays) or a group's (nack delays)."""
        if group is None:
            return _fit(f"{self.namespace}:t:{topic}:d{index}")
        return _fit(f"{self.namespace}:g:{topic}:{group}:d{index}")


def partition_kind(key: str | None, partitions: int) -> str:
    """The queue kind (and routing key) a message with ``key`` goes to."""
    if key is None:
        return ANY
    return f"p{zlib.crc32(key.encode('utf-8', 'surrogatepass')) % partitions}"


def bucket_ttl_ms(index: int) -> int:
    """TTL of delay bucket ``index``, whole milliseconds (RabbitMQ's unit)."""
    return math.ceil(_BUCKET_BASE_MS * 2 ** (index / _BUCKETS_PER_DOUBLING))


def _largest_bucket() -> int:
    index = 0
    while bucket_ttl_ms(index + 1) <= _MAX_TTL_MS:
        index += 1
    return index


#: The last bucket under RabbitMQ's TTL limit, and the longest delay this backend holds back.
MAX_BUCKET = _largest_bucket()
MAX_DELAY = bucket_ttl_ms(MAX_BUCKET) / 1000


def bucket_for(delay: float) -> int:
    """The smallest bucket whose TTL is at least ``delay`` seconds (never early).

    Raises:
        ConfigurationError: the delay is longer than ``MAX_DELAY``.
    """
    if delay > MAX_DELAY:
        raise ConfigurationError(
            f"delay {delay!r}s is over the {MAX_DELAY:.0f}s RabbitMQ can hold a message back "
            f"(x-message-ttl is limited to 2^31-1 ms); schedule it in steps or elsewhere"
        )
    wanted = delay * 1000
    index = max(
        0, math.ceil(_BUCKETS_PER_DOUBLING * math.log2(max(wanted, 1e-9) / _BUCKET_BASE_MS))
    )
    while index > 0 and bucket_ttl_ms(index - 1) >= wanted:
        index -= 1
    while bucket_ttl_ms(index) < wanted:
        index += 1
    return index


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse user headers that RabbitMQ or this backend give a meaning of their own."""
    for name in headers:
        if name in _BROKER_HEADERS or name.startswith(STATE_HEADER) or name == DELAY_HEADER:
            raise ConfigurationError(
                f"header {name!r} is reserved on RabbitMQ (the broker routes or rewrites it, "
                f"or wirework keeps its own state there); rename it"
            )
        # At most 4 UTF-8 bytes per character: only a long name needs encoding to be measured.
        if len(name) > _MAX_NAME // 4 and len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME:
            raise ConfigurationError(f"header name {name[:40]!r}... is over AMQP's 255 bytes")


@dataclass(frozen=True)
class Meta:
    """wirework's per-message state as it travels in ``STATE_HEADER``.

    ``attempts`` counts the deliveries before this copy of the message was
    published (a nack or lease expiry republishes a copy); RabbitMQ's own
    ``x-delivery-count`` counts the returns of this copy.
    """

    key: str | None = None
    attempts: int = 0
    first_failure_at: datetime | None = None
    last_error: Failure | None = None

    def after_failure(self, attempts: int, error: Failure | None, now: datetime) -> Meta:
        """The state of the copy published when delivery number ``attempts`` failed."""
        if error is None:
            return replace(self, attempts=attempts)
        return Meta(self.key, attempts, self.first_failure_at or now, error)

    def table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"attempts": self.attempts}
        if self.key is not None:
            table["key"] = self.key
        if self.first_failure_at is not None:
            table["first_failure_at"] = self.first_failure_at.isoformat()
        if self.last_error is not None:
            table["error"] = self.last_error.model_dump_json()
        return table

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Meta:
        first = table.get("first_failure_at")
        error = table.get("error")
        return cls(
            key=_text(table.get("key")),
            attempts=int(table.get("attempts", 0)),
            first_failure_at=datetime.fromisoformat(_text(first) or "") if first else None,
            last_error=Failure.model_validate_json(error) if error else None,
        )


#: The state of a first copy without a key, which reads back the same from no table at all.
_FRESH: Mapping[str, Any] = {"attempts": 0}


def outgoing_headers(message: WireMessage, state: Mapping[str, Any]) -> dict[str, Any]:
    """The AMQP headers of a message: the user's headers plus wirework's state table.

    The table is left out when it says nothing (a first copy without a key): a nested
    table is the dearest part of the headers to encode and decode, on both ends.
    """
    headers: dict[str, Any] = dict(message.headers)
    if state != _FRESH:
        headers[STATE_HEADER] = dict(state)
    return headers


def split_headers(
    headers: Mapping[str, Any] | None,
) -> tuple[WireMessage, dict[str, Any], int]:
    """Undo ``outgoing_headers``: (user headers with an empty body, state table, delivery count).

    Headers the broker added (``x-death`` after a delay queue, the quorum
    queue's ``x-delivery-count``) are dropped, so the user gets back exactly
    the headers that were published.
    """
    user: dict[str, str] = {}
    state: dict[str, Any] = {}
    count = 0
    for name, value in (headers or {}).items():
        if type(value) is str and not name.startswith(_SPECIAL_STARTS):
            user[name] = value  # nearly every header: a user's, as text (one test, per delivery)
        elif name == STATE_HEADER and isinstance(value, Mapping):
            state = dict(value)
        elif name == "x-delivery-count":
            count = int(value)
        elif name in _BROKER_HEADERS or name.startswith(STATE_HEADER) or name == DELAY_HEADER:
            continue
        else:
            user[name] = _text(value) or ""
    return WireMessage(headers=user), state, count


def _text(value: object) -> str | None:
    """A header value as text; AMQP libraries hand back bytes for non-UTF-8 long strings."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def dead_letter_state(record: DeadLetter) -> dict[str, Any]:
    """The state table of a dead-letter record (the message body and headers travel as is)."""
    state: dict[str, Any] = {
        "dead_letter_id": record.id,
        "topic": record.topic,
        "group": record.group,
        "reason": record.reason.value,
        "attempts": record.attempts,
        "first_failure_at": record.first_failure_at.isoformat(),
        "last_failure_at": record.last_failure_at.isoformat(),
        "dead_lettered_at": record.dead_lettered_at.isoformat(),
    }
    if record.key is not None:
        state["key"] = record.key
    if record.error is not None:
        state["error"] = record.error.model_dump_json()
    return state


def dead_letter_from(message: WireMessage, state: Mapping[str, Any]) -> DeadLetter:
    """Rebuild a record from what ``dead_letter_state`` wrote."""
    error = state.get("error")
    return DeadLetter(
        id=_text(state["dead_letter_id"]) or "",
        topic=_text(state["topic"]) or "",
        group=_text(state["group"]) or "",
        message_id=message.message_id,
        reason=DeadLetterReason(_text(state["reason"]) or ""),
        attempts=int(state["attempts"]),
        first_failure_at=datetime.fromisoformat(_text(state["first_failure_at"]) or ""),
        last_failure_at=datetime.fromisoformat(_text(state["last_failure_at"]) or ""),
        dead_lettered_at=datetime.fromisoformat(_text(state["dead_lettered_at"]) or ""),
        error=Failure.model_validate_json(error) if error else None,
        message=message,
        key=_text(state.get("key")),
    )


def dead_letter_id(unique: str, topic: str, group: str) -> str:
    """A record id that names where the record lives, so get and replay read one queue."""
    return f"{unique}:{topic}:{group}"


def parse_dead_letter_id(dead_letter_id: str) -> tuple[str, str] | None:
    """(topic, group) of a record id, or None if it cannot be one of ours."""
    parts = dead_letter_id.split(":")
    if len(parts) != 3 or not all(NAME_PATTERN.fullmatch(part) for part in parts):
        return None
    return parts[1], parts[2]
