"""What the NATS backend keeps beside the messages: per-delivery state, key cursors, dead letters.

JetStream counts deliveries (``num_delivered``) but not what wirework needs to
know about them, so three small streams of the namespace hold the rest:

``<ns>__STATE``: one record per (group, message) that needs one, subject
    ``<ns>.s.<topic>.<group>.<seq>``, at most one message per subject. It holds
    how many deliveries were *not* attempts (a delayed message delivered early,
    a message handed back unseen), the first failure time and the last error,
    and until when the message is held back (for ``stats``). The attempt is
    ``num_delivered - waits``. A record is deleted (not tombstoned) when its
    message is settled, so the stream holds only unsettled messages' records.
``<ns>__KEYS``: per (group, key) the stream sequence of the last settled message
    with that key (the key's *cursor*). A message with a key may be handed out
    only if it is the first message with that key after the cursor. Records
    expire after ``key_state_ttl`` idle seconds; an expired cursor is as good as
    the group's ack floor (see ``nats_reader``).
``<ns>__DLQ``: dead letters, subject ``<ns>.dlq.<topic>.<group>.<reason>``: the
    original headers and body, and the record in ``Wirework-Dead-Letter``. The
    dead letter's id is its sequence in this stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wirework.brokers.base import DeadLetter, DeadLetterReason, Failure
from wirework.brokers.nats_client import (
    STREAM_NOT_FOUND,
    WRONG_LAST_SEQUENCE,
    Connection,
    JetStreamRefusedError,
    Stored,
)
from wirework.brokers.nats_wire import (
    H_DEAD_LETTER,
    H_MSG_ID,
    Names,
    decode_headers,
    dump_json,
    encode_headers,
    escape,
    header_bytes,
)
from wirework.envelope import WireMessage
from wirework.errors import BrokerError

if TYPE_CHECKING:
    from wirework.brokers.nats import NatsSettings


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _failure(value: Any) -> Failure | None:
    return Failure.model_validate(value) if isinstance(value, dict) else None


@dataclass(frozen=True)
class MessageState:
    """What JetStream does not know about one group's copy of one message."""

    waits: int = 0
    """Deliveries that were not attempts (early for a delay, handed back unseen)."""
    first_failure_at: datetime | None = None
    last_error: Failure | None = None
    due: float | None = None
    """Unix time the message is held back until (publish or nack delay), for stats."""
    record: int = 0
    """Sequence of this record in the state stream; 0 if not stored."""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "waits": self.waits,
                "first_failure_at": _time(self.first_failure_at),
                "last_error": None if self.last_error is None else self.last_error.model_dump(),
                "due": self.due,
            }
        ).encode()

    @classmethod
    def decode(cls, stored: Stored) -> MessageState:
        data = json.loads(stored.data)
        return cls(
            waits=int(data.get("waits") or 0),
            first_failure_at=_parse_time(data.get("first_failure_at")),
            last_error=_failure(data.get("last_error")),
            due=data.get("due"),
            record=stored.seq,
        )


@dataclass(frozen=True)
class Cursor:
    """The last settled sequence of one key in one group, and the record's own sequence."""

    done: int = 0
    record: int = 0


class Stores:
    """The namespace's state, key and dead-letter streams, created on first use."""

    def __init__(self, connection: Connection, names: Names, settings: NatsSettings) -> None:
        self.connection = connection
        self.names = names
        self.settings = settings
        self._ready: set[str] = set()

    def _config(self, name: str, subjects: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "subjects": [subjects],
            "storage": "file",
            "num_replicas": self.settings.replicas,
            "allow_direct": True,
            "discard": "old",
            "duplicate_window": int(self.settings.duplicate_window * 1e9),
            **extra,
        }

    async def ensure(self, which: str) -> str:
        """The stream ``which`` ("state", "keys" or "dlq"), created if missing."""
        names = self.names
        name = {"state": names.state_stream, "keys": names.keys_stream, "dlq": names.dlq_stream}[
            which
        ]
        if name in self._ready:
            return name
        root = names.root
        if which == "state":
            config = self._config(name, f"{root}.s.>", max_msgs_per_subject=1)
        elif which == "keys":
            config = self._config(
                name,
                f"{root}.k.>",
                max_msgs_per_subject=1,
                max_age=int(self.settings.key_state_ttl * 1e9),
            )
        else:
            config = self._config(name, f"{root}.dlq.>")
        await self.connection.ensure_stream(config)
        self._ready.add(name)
        return name

    async def store(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        """Publish to one of these streams and wait for JetStream's ack; its sequence.

        Raises:
            JetStreamRefusedError: JetStream refused it (e.g. a failed compare-and-set).
            BrokerUnavailableError: no answer.
        """
        with self.connection.translate(f"storing {subject}"):
            reply = await self.connection.request(subject, payload, headers=headers or None)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise JetStreamRefusedError(f"storing {subject}", answer["error"])
        return int(answer["seq"])

    # -- message state ------------------------------------------------------------------

    async def state(self, topic: str, group: str, seq: int) -> MessageState:
        found = await self.connection.direct_get(
            await self.ensure("state"), last_by_subj=self.names.state_subject(topic, group, seq)
        )
        return MessageState() if found is None else MessageState.decode(found)

    async def save_state(
        self, topic: str, group: str, seq: int, state: MessageState
    ) -> MessageState:
        await self.ensure("state")
        record = await self.store(self.names.state_subject(topic, group, seq), state.encode(), {})
        return replace(state, record=record)

    async def drop_state(self, state: MessageState) -> None:
        if state.record:
            await self.connection.delete_message(self.names.state_stream, state.record)

    async def states(self, topic: str, group: str) -> list[MessageState]:
        """Every record of a group."""
        found = await self.connection.scan(
            await self.ensure("state"), self.names.state_filter(topic, group)
        )
        return [MessageState.decode(stored) for stored in found]

    async def purge(self, topic: str, group: str) -> None:
        """Drop a deleted group's state records and key cursors."""
        names = self.names
        for stream, subject in (
            (names.state_stream, names.state_filter(topic, group)),
            (names.keys_stream, f"{names.root}.k.{escape(topic)}.{escape(group)}.*"),
        ):
            try:
                await self.connection.api(
                    f"STREAM.PURGE.{stream}", {"filter": subject}, what=f"purging {subject}"
                )
            except JetStreamRefusedError as exc:
                if exc.err_code != STREAM_NOT_FOUND:
                    raise

    # -- key cursors --------------------------------------------------------------------

    async def cursor(self, topic: str, group: str, token: str) -> Cursor:
        found = await self.connection.direct_get(
            await self.ensure("keys"), last_by_subj=self.names.cursor_subject(topic, group, token)
        )
        if found is None:
            return Cursor()
        return Cursor(done=int(json.loads(found.data)["done"]), record=found.seq)

    async def advance(self, topic: str, group: str, token: str, seq: int, seen: Cursor) -> None:
        """Move the key's cursor to ``seq`` (compare-and-set: never backwards)."""
        await self.ensure("keys")
        subject = self.names.cursor_subject(topic, group, token)
        payload = json.dumps({"done": seq}).encode()
        for _ in range(5):
            headers = {}
            if seen.record:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(seen.record)
            try:
                await self.store(subject, payload, headers)
                return
            except JetStreamRefusedError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
            seen = await self.cursor(topic, group, token)
            if seen.done >= seq:
                return
        raise BrokerError(f"the cursor of a key on {topic}/{group} keeps changing; retry later")

    # -- dead letters -------------------------------------------------------------------

    async def add_dead_letter(self, record: DeadLetter, *, msg_id: str, max_payload: int) -> None:
        """Store a dead letter; ``msg_id`` makes a retried move of the same delivery count once."""
        await self.ensure("dlq")
        meta = {
            "topic": record.topic,
            "group": record.group,
            "reason": record.reason.value,
            "attempts": record.attempts,
            "first_failure_at": _time(record.first_failure_at),
            "last_failure_at": _time(record.last_failure_at),
            "dead_lettered_at": _time(record.dead_lettered_at),
            "error": None if record.error is None else record.error.model_dump(),
            "key": record.key,
        }
        control = {H_DEAD_LETTER: dump_json(meta), H_MSG_ID: msg_id}
        headers = encode_headers(record.message, control)
        size = len(record.message.body) + header_bytes(headers)
        if size > max_payload and record.error is not None:
            # The message fitted when published; only the error text can make it too big.
            short = record.error.model_copy(update={"message": record.error.message[:200]})
            meta["error"] = short.model_dump()
            headers[H_DEAD_LETTER] = dump_json(meta)
        subject = self.names.dlq_subject(record.topic, record.group, record.reason.value)
        await self.store(subject, record.message.body, headers)

    @staticmethod
    def read_dead_letter(stored: Stored) -> DeadLetter:
        own, control = decode_headers(stored.headers)
        meta = json.loads(control[H_DEAD_LETTER])
        message = WireMessage(headers=own, body=stored.data)
        now = datetime.now(UTC)
        return DeadLetter(
            id=str(stored.seq),
            topic=meta["topic"],
            group=meta["group"],
            message_id=message.message_id,
            reason=DeadLetterReason(meta["reason"]),
            attempts=int(meta["attempts"]),
            first_failure_at=_parse_time(meta["first_failure_at"]) or now,
            last_failure_at=_parse_time(meta["last_failure_at"]) or now,
            dead_lettered_at=_parse_time(meta["dead_lettered_at"]) or now,
            error=_failure(meta.get("error")),
            message=message,
            key=meta.get("key"),
        )
