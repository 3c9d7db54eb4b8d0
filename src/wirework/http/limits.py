"""Limits on what a request may send (RELIABILITY.md DEV-25, §3.7), and the checks that keep them.

Three places enforce them, each where it is cheapest and earliest:

* the HTTP protocol (``wirework.http.server``): the header block's size and
  count while the headers arrive (431 before they are buffered whole), and
  the header-read timeout (a slowloris is cut), because uvicorn has neither;
* ``LimitsMiddleware``, an ASGI layer: the same header checks for any other
  server, and a declared ``Content-Length`` over the limit (413 before a byte
  of the body is read);
* the routes, while they read a body: the byte count of a chunked body (413
  at the first chunk past the limit) and the nesting depth of its JSON (400).
"""

from __future__ import annotations

import re
from itertools import chain

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from wirework.http.errors import HeadersTooLargeError, PayloadTooLargeError
from wirework.http.problems import send_error


class HttpLimits(BaseSettings):
    """What one HTTP request may send; the defaults are RELIABILITY.md §3.7's.

    Read from ``WIREWORK_HTTP_*`` environment variables too (e.g.
    ``WIREWORK_HTTP_MAX_BODY_BYTES=4194304``). Durations are seconds.
    """

    model_config = SettingsConfigDict(env_prefix="WIREWORK_HTTP_", extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=1 << 20, ge=1)
    """A request body (a whole NDJSON stream included); larger is 413."""
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """The request line and headers together; larger is 431."""
    max_headers: int = Field(default=100, ge=1)
    """Header lines in one request; more is 431."""
    max_json_depth: int = Field(default=32, ge=1, le=1000)
    """Nesting of arrays and objects in a JSON body; deeper is 400."""
    header_read_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """From a connection's first byte of a request to its last header; then it is closed."""
    idle_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """How long a kept-alive connection may wait for its next request."""


class LimitsMiddleware:
    """Refuse oversized headers (431) and a declared oversized body (413) before routing.

    Pure ASGI and one pass over the header list, so it costs about a
    microsecond a request; the response says ``connection: close`` so the
    server does not go on reading what it refused.
    """

    def __init__(self, app: ASGIApp, *, limits: HttpLimits) -> None:
        self.app = app
        self.max_headers = limits.max_headers
        self.max_header_bytes = limits.max_header_bytes
        self.max_body_bytes = limits.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = (
                sum(map(len, chain.from_iterable(headers)))
                + 4 * len(headers)
                + len(scope.get("raw_path") or b"")
                + len(scope.get("query_string") or b"")
            )
            if len(headers) > self.max_headers or size > self.max_header_bytes:
                refused: Exception = HeadersTooLargeError(
                    f"the request has {len(headers)} headers in about {size} bytes; the limit "
                    f"is {self.max_headers} headers and {self.max_header_bytes} bytes"
                )
                await send_error(send, refused, scope["path"], close=True)
                return
            declared = dict(headers).get(b"content-length")
            if declared is not None and _over(declared, self.max_body_bytes):
                refused = PayloadTooLargeError(
                    f"the request body declares {declared.decode('latin-1')[:20]} bytes; the "
                    f"limit is {self.max_body_bytes} bytes (HttpLimits.max_body_bytes)"
                )
                await send_error(send, refused, scope["path"], close=True)
                return
        await self.app(scope, receive, send)


def _over(declared: bytes, limit: int) -> bool:
    # A malformed Content-Length never reaches here: the HTTP parser refuses it.
    return len(declared) > 18 or (declared.isdigit() and int(declared) > limit)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects deeper than ``max_depth``.

    Checked before parsing, so a 10,000-deep document costs a scan, not a
    recursion: the bracket count bounds the depth, so an ordinary body is
    passed after two C-speed counts; only a bracket-heavy one has its strings
    removed and its brackets walked.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False
