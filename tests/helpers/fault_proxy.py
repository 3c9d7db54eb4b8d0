"""A small asyncio TCP proxy that injects network faults, in the spirit of toxiproxy.

Put it between a client and one upstream (a broker, an HTTP backend) and
point the client at ``proxy.port``::

    async with FaultProxy("127.0.0.1", 6379) as proxy:
        proxy.latency = 0.1   # every chunk, each way, arrives 100 ms late
        proxy.cut()           # reset every open connection at once
        proxy.blackhole = True  # accept and swallow everything, answer nothing

Faults change at any moment and apply to open connections as well as new
ones. ``cut`` resets (RST) rather than closing politely, as a dead peer or a
dropped NAT entry does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self

_CHUNK = 65536


class FaultProxy:
    """Forward ``host:port`` connections to ``upstream``, with latency, cuts and a blackhole.

    Attributes:
        latency: seconds each chunk waits before it is forwarded, in both directions.
        blackhole: while true, bytes in either direction are read and dropped, and a new
            connection is accepted but never reaches the upstream.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.latency = 0.0
        self.blackhole = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port clients connect to."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._clients)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)

    def cut(self) -> int:
        """Reset every open connection, client and upstream side; returns how many sockets."""
        writers = list(self._writers)
        for writer in writers:
            _reset(writer)
        return len(writers)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        self._writers.add(client)
        self._clients.add(client)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.blackhole:
                await self._swallow(client_reader)
                return
            try:
                upstream_reader, upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                _reset(client)  # the upstream is down: so is the proxied service
                return
            self._writers.add(upstream)
            async with asyncio.TaskGroup() as pipes:
                forward = pipes.create_task(self._pipe(client_reader, upstream))
                back = pipes.create_task(self._pipe(upstream_reader, client))
                forward.add_done_callback(lambda _: back.cancel())
                back.add_done_callback(lambda _: forward.cancel())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(client)
            for writer in (client, upstream):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(_CHUNK):
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                if self.blackhole:
                    continue
                writer.write(chunk)
                await writer.drain()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(_CHUNK):
                pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0 makes the kernel drop the connection instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
