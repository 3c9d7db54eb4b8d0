"""Named crash points for fault tests (RELIABILITY.md §2.0).

A process started with ``FAULT_POINT=<name>`` calls ``os._exit(137)`` when it
reaches that point, as a ``kill -9`` would leave it: no ``finally``, no ack, no
flush. ``FAULT_EVERY=N`` fires on the N-th time the point is reached (default
1), so a test can crash mid-stream instead of on the first message.

The points this package has (an instrumentation contract: tests rely on them):

``consume.after_receive``, ``consume.after_deserialize``,
``consume.after_handler``, ``consume.after_commit_before_ack``,
``consume.after_ack``, ``publish.before_commit``, ``publish.after_commit``.

``publish.before_commit`` and ``publish.after_commit`` are the SQLite broker's
(``sqlite_writer``): they fire around the COMMIT of a transaction that stores
messages, once its rows are written and once they are committed, before any of
its publishes returns (under strict, the WAL's sync is still to come). On the
server backends the commit is the server's, out of a client process's reach.

``consume.after_commit_before_ack`` fires after the handler returned and
before the ack is sent; until the inbox exists it is the same moment as
``consume.after_handler``.
"""

from __future__ import annotations

import os

EXIT_CODE = 137

_ARMED = os.environ.get("FAULT_POINT") or None
_EVERY = max(1, int(os.environ.get("FAULT_EVERY", "1") or "1"))
_reached = 0

ARMED = _ARMED is not None
"""Whether this process was started to crash somewhere: a hot path asks this first.

``if ARMED: fault_point(...)`` costs a third of the call it skips; the consumer
passes five points a message.
"""


def fault_point(name: str) -> None:
    """Die here, at once, if this process was started to crash at ``name``."""
    global _reached
    if _ARMED is None or name != _ARMED:
        return
    _reached += 1
    if _reached >= _EVERY:
        os._exit(EXIT_CODE)
