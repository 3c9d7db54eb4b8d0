"""Waking idle subscribers in other processes the moment something is committed.

Each broker instance binds one Linux *abstract* Unix datagram socket (no file
on disk, gone when the process dies) and records its address per topic in the
``ww_listeners`` table. After a commit that makes messages available, the
writer sends the topic name to each listener of that topic; a listener whose
socket is gone (a killed process) is forgotten. Idle subscribers therefore
sleep until rung, and poll only at ``poll_interval`` as a safety net (and for
leases and delays that run out). Where abstract sockets do not exist (macOS,
Windows) the doorbell is off and subscribers poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterable

_MAX_DATAGRAM = 256


def doorbell_supported() -> bool:
    return sys.platform.startswith("linux")


class Doorbell:
    """One process-side endpoint: rings others' bells and wakes its own waiters."""

    def __init__(self) -> None:
        self.address = f"wirework-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._receiver: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Bind and start listening; False when this platform has no doorbell."""
        if not doorbell_supported():
            return False
        self._loop = loop
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind("\0" + self.address)
        receiver.setblocking(False)
        loop.add_reader(receiver.fileno(), self._on_readable)
        self._receiver = receiver
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        self._sender = sender
        return True

    def close(self) -> None:
        if self._receiver is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._receiver.fileno())
            self._receiver.close()
            self._receiver = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def waiter(self, topic: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters[topic].add(event)
        return event

    def forget(self, topic: str, event: asyncio.Event) -> None:
        self._waiters[topic].discard(event)

    def wake_local(self, topics: Iterable[str]) -> None:
        """Wake this process's waiters; call on the event loop thread."""
        for topic in topics:
            for event in self._waiters.get(topic, ()):
                event.set()

    def wake_all_local(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    def ring(self, addresses: Iterable[tuple[str, str]]) -> list[str]:
        """Send each (address, topic); safe from any thread. Returns addresses that are gone."""
        sender = self._sender
        gone: list[str] = []
        if sender is None:
            return gone
        for address, topic in addresses:
            if address == self.address:
                continue
            try:
                sender.sendto(topic.encode(), "\0" + address)
            except (ConnectionRefusedError, FileNotFoundError):
                gone.append(address)
            except (BlockingIOError, OSError):
                # A full receive buffer means that process is being woken already.
                continue
        return gone

    def _on_readable(self) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        topics: set[str] = set()
        while True:
            try:
                data = receiver.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            topics.add(data.decode(errors="replace"))
        self.wake_local(topics)
