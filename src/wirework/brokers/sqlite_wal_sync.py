"""The WAL's sync under ``durability="strict"``, on a thread of its own, off the write lock.

``synchronous=FULL`` makes SQLite sync the WAL inside COMMIT, with the write
lock held, so whoever commits waits on the disk: 0.12-0.25 ms on the bench
machine, milliseconds on many cloud disks. The event loop must not, so every synced
commit went to the writer's thread, and paid a hand-over each way for the
transaction's whole work (``bench.gil_probe``: in one process the GIL lets the
two take turns, not overlap).

Instead the loop commits such a transaction with ``synchronous=NORMAL`` and
asks this thread to ``fdatasync`` the WAL: the sync SQLite runs after a FULL
commit, of the same file. The transaction's publishes return once it is done,
as they would after a FULL commit. Meanwhile the loop goes on (claims, acks,
the next publishes) and the lock is free; commits made during a sync are
covered by the next one, one sync for all of them (group commit without a
lock held across the disk wait). WAL frames are checksummed in a chain, so
after a power loss SQLite replays a prefix of them: a synced frame keeps every
frame before it, and no later one survives without it.

What differs from FULL: a commit is visible to other connections from its
COMMIT, before its sync, as RabbitMQ delivers a persistent message before its
fsync and confirms it after. A consumer may handle a message whose publish has
not yet returned; an OS crash or power loss in those microseconds can then
undo the message after it was handled, and its publisher, never answered,
publishes it again. A process crash (``kill -9``) loses nothing either way: its
writes are in the kernel's page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

#: Data (and the size) without the timestamps, as SQLite syncs on Linux; fsync elsewhere.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def sync_file(path: Path, *, directory: bool = False) -> None:
    """Sync ``path``'s data to disk; the WAL is opened anew each time.

    Anew, so the sync always reaches the file SQLite writes now, whatever
    happened to the one opened before: an open costs microseconds, a sync
    of the wrong inode a lost message. A file is opened for writing (nothing
    is written), as some systems sync only such; a directory for reading.
    """
    mode = os.O_RDONLY if directory else os.O_RDWR
    fd = os.open(path, mode | getattr(os, "O_CLOEXEC", 0))
    try:
        _datasync(fd)
    finally:
        os.close(fd)


class WalSync:
    """Syncs the WAL on its thread, one request at a time; answers on the loop.

    ``synced(error)`` runs on the loop after each sync, with the exception that
    failed it or None: an ``OSError``, or anything else, never a thread that dies
    and publishes that wait forever. The caller asks for the next sync only after.
    """

    def __init__(
        self,
        wal: Path,
        *,
        loop: asyncio.AbstractEventLoop,
        synced: Callable[[Exception | None], None],
    ) -> None:
        self.wal = wal
        self._loop = loop
        self._synced = synced
        self._requests: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="wirework-sqlite-sync", daemon=True)
        self._started = False
        self._directory_synced = False

    def request(self) -> None:
        """Sync the WAL now: everything committed so far, by any connection."""
        if not self._started:
            self._started = True
            self._thread.start()
        self._requests.put(True)

    async def close(self) -> None:
        """End the thread once the requests before are answered."""
        if self._started:
            self._requests.put(False)
            await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        while self._requests.get():
            error: Exception | None = None
            try:
                self._sync()
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._synced, error)

    def _sync(self) -> None:
        sync_file(self.wal)
        if not self._directory_synced:
            # The WAL's own name, once: SQLite syncs the directory after creating it
            # only at the WAL's first sync, which under NORMAL may not have come yet.
            # Windows has no directory sync (nor does SQLite there).
            if os.name != "nt":
                sync_file(self.wal.parent, directory=True)
            self._directory_synced = True
