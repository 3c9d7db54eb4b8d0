"""wirework's own tables, as ordered, versioned migrations per dialect.

``wirework_schema_version`` holds one row per applied version. Applying is
idempotent, and safe when several processes start at once: each backend
takes a lock first (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction
advisory lock per schema), reads the version, and applies only the steps
above it, all in that one transaction. A database whose version is above
every step known here was upgraded by a newer wirework, and is refused.

A new version is a new ``Migration`` at the end of ``MIGRATIONS``; a shipped
one is never edited.
"""

from __future__ import annotations

from dataclasses import dataclass

from wirework.store.base import Dialect
from wirework.store.errors import StoreSchemaError

VERSION_TABLE = "wirework_schema_version"

CREATE_VERSION_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
    "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


@dataclass(frozen=True)
class Migration:
    """One schema version: the statements that reach it from the one before."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgresql


_INBOX = (
    "CREATE TABLE wirework_inbox ("
    " consumer_group TEXT NOT NULL,"
    " message_id TEXT NOT NULL,"
    " handled_at DOUBLE PRECISION NOT NULL,"
    " PRIMARY KEY (consumer_group, message_id))"
)
_INBOX_AGE = "CREATE INDEX wirework_inbox_age ON wirework_inbox (handled_at)"
_OUTBOX_COLUMNS = (
    " topic TEXT NOT NULL,"
    " message_id TEXT NOT NULL,"
    " message_key TEXT,"
    " headers TEXT NOT NULL,"
    " created_at DOUBLE PRECISION NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " last_error TEXT"
)
_LEASE = (
    "CREATE TABLE wirework_relay_lease ("
    " name TEXT PRIMARY KEY,"
    " holder TEXT NOT NULL,"
    " expires_at DOUBLE PRECISION NOT NULL)"
)

_SAGA = (
    "CREATE TABLE wirework_saga ("
    " saga_id TEXT PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " status TEXT NOT NULL,"
    " input TEXT NOT NULL,"
    " error TEXT,"
    " owner TEXT,"
    " lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,"
    " created_at DOUBLE PRECISION NOT NULL,"
    " updated_at DOUBLE PRECISION NOT NULL,"
    " ended_at DOUBLE PRECISION)"
)
_SAGA_STATUS = "CREATE INDEX wirework_saga_status ON wirework_saga (status, updated_at)"
_SAGA_EVENT_COLUMNS = (
    " saga_id TEXT NOT NULL,"
    " at DOUBLE PRECISION NOT NULL,"
    " kind TEXT NOT NULL,"
    " step TEXT,"
    " attempt INTEGER,"
    " status TEXT NOT NULL,"
    " data TEXT NOT NULL"
)
_SAGA_EVENT_INDEX = "CREATE INDEX wirework_saga_event_saga ON wirework_saga_event (saga_id, seq)"

_IDEMPOTENCY_COLUMNS = (
    " endpoint TEXT NOT NULL,"
    " client TEXT NOT NULL,"
    " key_hash TEXT NOT NULL,"
    " fingerprint TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " holder TEXT NOT NULL,"
    " started_at DOUBLE PRECISION NOT NULL,"
    " lease_until DOUBLE PRECISION NOT NULL,"
    " expires_at DOUBLE PRECISION NOT NULL,"
    " status INTEGER,"
    " headers TEXT,"
)
#: The holder's ``lease_timeout``: a lease ending further ahead than its own length is
#: from a clock gone back (0: written before version 4; the claimer's length is used).
_SAGA_LEASE_LENGTH = (
    "ALTER TABLE wirework_saga ADD COLUMN lease_timeout DOUBLE PRECISION NOT NULL DEFAULT 0"
)
_IDEMPOTENCY_KEY = ", PRIMARY KEY (endpoint, client, key_hash))"
_IDEMPOTENCY_AGE = (
    "CREATE INDEX wirework_idempotency_keys_age ON wirework_idempotency_keys (expires_at)"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="inbox claims, outbox rows, the relay lease",
        sqlite=(
            _INBOX,
            _INBOX_AGE,
            # AUTOINCREMENT: a sequence number is never reused, even after the
            # newest rows were published and deleted.
            "CREATE TABLE wirework_outbox ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT," + _OUTBOX_COLUMNS + ", body BLOB NOT NULL)",
            _LEASE,
        ),
        postgresql=(
            _INBOX,
            _INBOX_AGE,
            "CREATE TABLE wirework_outbox ("
            " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            + _OUTBOX_COLUMNS
            + ", body BYTEA NOT NULL)",
            _LEASE,
        ),
    ),
    Migration(
        version=2,
        description="saga instances and their history (wirework.saga)",
        sqlite=(
            _SAGA,
            _SAGA_STATUS,
            "CREATE TABLE wirework_saga_event ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT," + _SAGA_EVENT_COLUMNS + ")",
            _SAGA_EVENT_INDEX,
        ),
        postgresql=(
            _SAGA,
            _SAGA_STATUS,
            "CREATE TABLE wirework_saga_event ("
            " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY," + _SAGA_EVENT_COLUMNS + ")",
            _SAGA_EVENT_INDEX,
        ),
    ),
    Migration(
        version=3,
        description="HTTP Idempotency-Key records (wirework.http.idempotency)",
        sqlite=(
            "CREATE TABLE wirework_idempotency_keys ("
            + _IDEMPOTENCY_COLUMNS
            + " body BLOB"
            + _IDEMPOTENCY_KEY,
            _IDEMPOTENCY_AGE,
        ),
        postgresql=(
            "CREATE TABLE wirework_idempotency_keys ("
            + _IDEMPOTENCY_COLUMNS
            + " body BYTEA"
            + _IDEMPOTENCY_KEY,
            _IDEMPOTENCY_AGE,
        ),
    ),
    Migration(
        version=4,
        description="each saga lease's own length, so leases of other lengths are told apart",
        sqlite=(_SAGA_LEASE_LENGTH,),
        postgresql=(_SAGA_LEASE_LENGTH,),
    ),
)

LATEST = MIGRATIONS[-1].version


def pending(current: int | None, *, where: str) -> list[Migration]:
    """The migrations to apply on a database at version ``current`` (None: none applied).

    Raises:
        StoreSchemaError: the database is at a version this wirework does not know.
    """
    at = current or 0
    if at > LATEST:
        raise StoreSchemaError(
            f"the wirework schema in {where} is at version {at}, newer than this "
            f"wirework knows ({LATEST}); upgrade wirework, or point it at another database"
        )
    return [migration for migration in MIGRATIONS if migration.version > at]
