"""``HttpServer``: uvicorn, run inside the current event loop, with the limits uvicorn lacks.

uvicorn (0.54) parses with httptools (llhttp), the fastest of its HTTP/1.1
protocols, but enforces no header limits and no header-read timeout: its
only timer is the keep-alive one, armed after a response and cancelled by
any byte, so a client trickling a header a byte a second holds a connection
forever, and headers are buffered however many arrive. ``LimitedProtocol``
is a thin subclass that adds both (RELIABILITY.md DEV-25):

* a header-read timer, armed when a connection opens and when a request's
  first byte arrives, cancelled when its headers are complete; when it
  fires the connection is closed;
* a count of the request line and header bytes and of header lines while
  the parser reports them; past ``HttpLimits`` it answers 431
  problem+json and closes, before buffering the rest.

The server takes no signal handlers (the runner owns those) and leaves the
process's logging configuration alone.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from types import TracebackType
from typing import Any, Self

import httptools
import orjson
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import Server, ServerState

from wirework.errors import ConfigurationError
from wirework.http.errors import HeadersTooLargeError
from wirework.http.limits import HttpLimits
from wirework.http.problems import PROBLEM_MEDIA_TYPE, problem_for


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header-read timeout and header limits."""

    limits: HttpLimits
    """Set by ``HttpServer`` on a subclass made per server (uvicorn builds protocols itself)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_lines = 0
        self._refused: HeadersTooLargeError | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refused is not None:
                self._send_431(self._refused)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            # WebSockets are off (ws="none"): an upgrade request is answered as plain HTTP.
            self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._header_lines = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), lines=0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, lines=1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def _count(self, size: int, *, lines: int) -> None:
        self._header_bytes += size
        self._header_lines += lines
        limits = self.limits
        if self._header_lines > limits.max_headers or self._header_bytes > limits.max_header_bytes:
            self._refused = HeadersTooLargeError(
                f"the request line and headers are over {limits.max_header_bytes} bytes or "
                f"{limits.max_headers} lines (HttpLimits); send fewer or smaller headers"
            )
            # Raised inside the parser's callback: httptools stops and data_received answers.
            raise self._refused

    def _send_431(self, error: HeadersTooLargeError) -> None:
        self._cancel_header_timer()
        body = orjson.dumps(problem_for(error, self._path()))
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[431],
                    b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    def _path(self) -> str:
        try:
            path: bytes = httptools.parse_url(self.url).path or b"/"
        except (httptools.HttpParserInvalidURLError, AttributeError):
            return ""
        return path.decode("latin-1")[:200]

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.limits.header_read_timeout, self._header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info(
                "closing a connection from %s: no complete request headers within %gs",
                self.client,
                self.limits.header_read_timeout,
            )
            self.transport.close()


class HttpServer:
    """uvicorn serving ``app`` from the current event loop, started and stopped in code.

    Args:
        app: the ASGI app (``http_app(...)``).
        host: the address to listen on.
        port: the port; 0 picks a free one (read ``.port`` after ``start``).
        limits: header limits and timeouts (the app's ``HttpLimits``, usually).
        grace: seconds in-flight requests get to finish when the server stops.
        backlog: the listen backlog.

    The event loop is the caller's: run under ``uvloop`` for throughput
    (``uvloop.run(main())``); ``asyncio`` works too.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: HttpLimits | None = None,
        grace: float = 5.0,
        backlog: int = 2048,
        reuse_port: bool = False,
    ) -> None:
        self.app = app
        self.reuse_port = reuse_port
        """Bind with SO_REUSEPORT, so worker processes share one port (the kernel balances)."""
        self.host = host
        self.requested_port = port
        self.limits = limits or _limits_of(app)
        self.grace = grace
        self.backlog = backlog
        self._server: Server | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the chosen one when created with port 0).

        Raises:
            ConfigurationError: the server is not started.
        """
        if self._port is None:
            raise ConfigurationError("HttpServer.port is known once start() has returned")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def in_flight(self) -> int:
        """Requests being answered now (0 when stopped)."""
        return len(self._server.server_state.tasks) if self._server is not None else 0

    async def start(self) -> None:
        """Listen and serve in the background of the current loop; return once listening.

        Raises:
            ConfigurationError: already started, or the address cannot be
                listened on (in use, not local); the message names it.
        """
        if self._task is not None:
            raise ConfigurationError("HttpServer.start(): the server is already running")
        limited = type("LimitedProtocol", (LimitedProtocol,), {"limits": self.limits})
        config = Config(
            self.app,
            http=limited,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=int(max(1, self.limits.idle_timeout)),
            timeout_graceful_shutdown=int(max(1, self.grace)),
            backlog=self.backlog,
        )
        config.load()
        sock = self._bind()
        server = Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._socket = server, sock
        self._port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._run(server, sock), name=f"http-server:{self.port}")

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            hint = (
                "choose another port, or 0 for a free one" if exc.errno == errno.EADDRINUSE else ""
            )
            raise ConfigurationError(
                f"HttpServer cannot listen on {self.host}:{self.requested_port}: {exc}; {hint}"
            ) from exc
        return sock

    async def _run(self, server: Server, sock: socket.socket) -> None:
        await server.main_loop()
        await server.shutdown(sockets=[sock])

    async def stop(self) -> None:
        """Stop accepting connections, let in-flight requests finish (up to ``grace``), return."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = None
            self._task = None
            self._socket = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def _limits_of(app: ASGIApp) -> HttpLimits:
    """The limits ``http_app`` was built with, so the protocol and the app agree."""
    state = getattr(app, "state", None)
    limits = getattr(state, "limits", None)
    return limits if isinstance(limits, HttpLimits) else HttpLimits()
