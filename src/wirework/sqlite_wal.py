"""Switching a SQLite file to WAL when other connections open it at the same moment.

``PRAGMA journal_mode = WAL`` needs the file to itself. When other
connections are opening (or migrating) the same new file, SQLite may answer
"database is locked" at once instead of calling the busy handler that
``busy_timeout`` installs, so the timeout does not cover it: seen when four
stores opened one empty file together. The switch is retried here, briefly,
until ``timeout``; a file that is already in WAL mode answers at once.
"""

from __future__ import annotations

import sqlite3
import time

#: Seconds between tries of the switch.
RETRY_PAUSE = 0.01


def use_wal(connection: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode, retrying "locked" answers for up to ``timeout`` seconds.

    Raises:
        sqlite3.OperationalError: still locked after ``timeout``, or any other error.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
        time.sleep(RETRY_PAUSE)
