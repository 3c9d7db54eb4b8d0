"""The SQLite broker's tables, and how time is stored in them.

Every group holds its own row per message (``ww_deliveries``), so fan-out is a
write at publish time and a claim is an indexed read of one group's rows. A
message row is deleted when the last group lets go of it (``refs`` reaches 0),
so storage tracks the backlog, not history.

Lease and availability times are ``CLOCK_MONOTONIC`` seconds, which Linux
shares between processes, so a wall-clock jump neither redelivers nor stalls
anything. Monotonic time restarts at boot: the boot id kept in ``ww_meta``
tells a reopened file that its times are from another boot, and then every
lease is released and every delay ends at once (documented in the backend's
docs). Dead-letter times, which people read, are wall-clock UTC seconds.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS ww_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS ww_groups (
    topic TEXT NOT NULL,
    grp   TEXT NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS ww_messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL,
    key          TEXT,
    headers      BLOB    NOT NULL,
    body         BLOB    NOT NULL,
    published_at REAL    NOT NULL,
    refs         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ww_messages_topic ON ww_messages (topic, seq);

CREATE TABLE IF NOT EXISTS ww_deliveries (
    topic            TEXT    NOT NULL,
    grp              TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    key              TEXT,
    available_at     REAL    NOT NULL,
    lease_until      REAL,
    token            INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_failure_at REAL,
    last_error       TEXT,
    PRIMARY KEY (topic, grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ww_deliveries_key
    ON ww_deliveries (topic, grp, key, seq) WHERE key IS NOT NULL;

CREATE TABLE IF NOT EXISTS ww_dead_letters (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    topic            TEXT    NOT NULL,
    grp              TEXT    NOT NULL,
    key              TEXT,
    message_id       TEXT,
    reason           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    first_failure_at REAL    NOT NULL,
    last_failure_at  REAL    NOT NULL,
    dead_lettered_at REAL    NOT NULL,
    error            TEXT,
    headers          BLOB    NOT NULL,
    body             BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS ww_dead_letters_where ON ww_dead_letters (topic, grp, reason);

CREATE TABLE IF NOT EXISTS ww_listeners (
    address TEXT NOT NULL,
    topic   TEXT NOT NULL,
    PRIMARY KEY (topic, address)
) WITHOUT ROWID;
"""
