"""The Redis backend's settings, and how its values look in Redis.

Settings are read from the URL's query string, keyword arguments of
``connect``, or ``WIREWORK_REDIS_*`` environment variables; an unknown option
is an error. Times in Redis are the server's milliseconds since the epoch;
replies are bytes (``decode_responses=False``: bodies are never decoded).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wirework.brokers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    NAME_PATTERN,
    DeadLetter,
    DeadLetterReason,
    Failure,
)
from wirework.envelope import WireMessage


class RedisSettings(BaseSettings):
    """Settings of ``redis://``: query string, keyword, or ``WIREWORK_REDIS_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="WIREWORK_REDIS_", extra="forbid")

    namespace: str = "wirework"
    """Prefix of every key and channel this backend creates, so apps and tests never collide."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    """Largest message ``publish`` accepts, headers included (RELIABILITY.md §3.7)."""
    max_queue_length: int | None = Field(default=None, gt=0)
    """Entries a topic stream may keep (not yet settled by every group) before publish refuses."""
    connect_timeout: float = Field(default=2.0, gt=0)
    """Seconds to open a connection; a dead server is noticed this fast."""
    command_timeout: float = Field(default=5.0, gt=0)
    """Seconds one script may take, round trip included, before the connection counts as lost."""
    reconnect_initial_backoff: float = Field(default=0.05, gt=0)
    """First pause between reconnect attempts; it doubles, with jitter, up to the maximum."""
    reconnect_max_backoff: float = Field(default=2.0, gt=0)
    """Longest pause between reconnect attempts, so a returning server is found quickly."""
    publish_timeout: float = Field(default=10.0, gt=0)
    """Seconds a publish (or settle) may take in all, waiting for a reconnect included."""
    on_disconnect: Literal["fail", "wait"] = "fail"
    """While Redis is unreachable, ``fail`` refuses a publish at once (nothing was sent);
    ``wait`` waits for the reconnect, at most ``publish_timeout``."""
    poll_interval: float = Field(default=1.0, gt=0, le=60)
    """Longest an idle subscription sleeps without a wake-up (a safety net for pub/sub)."""
    max_connections: int = Field(default=64, ge=2)
    """Connections per broker; each running call holds one, the wake-up listener one more."""
    wait_aof: bool = False
    """Publish returns only once the server's AOF holds the message on disk (``WAITAOF``,
    Redis 7.2+ with ``appendonly yes``); an older server is refused with ConfigurationError."""
    wait_aof_timeout: float = Field(default=1.0, gt=0)
    """Seconds a publish waits for the AOF fsync under ``wait_aof``."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError("use 1-200 characters from A-Z a-z 0-9 . _ -")
        return value


def key_prefix(namespace: str) -> str:
    # The braces are a Redis Cluster hash tag: every key of a namespace shares one slot.
    return "{" + namespace + "}:"


def milliseconds(seconds: float) -> int:
    """Whole milliseconds, rounded up: a delay or lease never ends early."""
    return max(0, math.ceil(seconds * 1000))


def moment(ms: int | bytes | str) -> datetime:
    """A server time in milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


def text(value: bytes | str) -> str:
    """A name or id from a reply (names are validated ASCII, keys UTF-8)."""
    return value.decode() if isinstance(value, bytes) else value


def dead_letter_of(entry_id: str, fields: list[bytes]) -> DeadLetter:
    """A dead-letter record from its entry in the ``dlq`` stream (see ``redis_scripts``).

    ``dead_lettered_at`` is the entry id's time, so listing order and times agree.
    """
    record = {text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
    message = WireMessage(headers=orjson.loads(record["h"]), body=bytes(record["b"]))
    error = record.get("e") or b""
    at = moment(entry_id.split("-", 1)[0])
    return DeadLetter(
        id=entry_id,
        topic=text(record["t"]),
        group=text(record["g"]),
        message_id=message.message_id,
        reason=DeadLetterReason(text(record["r"])),
        attempts=int(record["a"]),
        first_failure_at=moment(record["f"]),
        last_failure_at=moment(record["l"]),
        dead_lettered_at=at,
        error=Failure.model_validate_json(error) if error else None,
        message=message,
        key=text(record["k"]) if "k" in record else None,
    )
