"""Reading a request body within its limit: counted as it arrives, decompressed with a cap.

The limit is checked at every chunk, so a body is refused (413) as soon as
it is known to be too large, never after being held whole. A compressed
body (``Content-Encoding: gzip`` or ``deflate``) is inflated in steps that
never produce more than the limit allows, so a gzip bomb (1 KiB that
inflates to 1 GiB) costs at most ``max_body_bytes`` of memory before its 413.
"""

from __future__ import annotations

import zlib

from starlette.types import Receive

from wirework.errors import BadRequestError
from wirework.http.errors import PayloadTooLargeError, UnsupportedEncodingError

DECODED_ENCODINGS = (b"gzip", b"x-gzip", b"deflate")


class ClientGoneError(Exception):
    """The client disconnected before its request was read: there is no one to answer."""


async def read_body(receive: Receive, limit: int, encoding: bytes | None = None) -> bytes:
    """The whole request body, decoded; 413 at the first chunk that takes it past ``limit``.

    Raises:
        PayloadTooLargeError: the body (or what it inflates to) is over ``limit``.
        UnsupportedEncodingError: a content coding other than gzip or deflate.
        BadRequestError: a compressed body that does not decompress.
        ClientGoneError: the client left before the body was read.
    """
    if encoding is not None and encoding.lower() not in (b"identity", *DECODED_ENCODINGS):
        raise UnsupportedEncodingError(
            f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not supported; "
            f"send the body uncompressed, or gzip or deflate it"
        )
    inflate = (
        zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # gzip or zlib, told apart by header
        if encoding is not None and encoding.lower() in DECODED_ENCODINGS
        else None
    )
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGoneError
    body: bytes = message.get("body", b"")
    if inflate is None and len(body) <= limit and not message.get("more_body", False):
        return body  # the common case: one small chunk, no copies
    received = 0
    decoded = bytearray()
    while True:
        received += len(body)
        if received > limit:
            raise PayloadTooLargeError(too_large(limit))
        if inflate is None:
            decoded += body
        else:
            _inflate(inflate, body, decoded, limit)
        if not message.get("more_body", False):
            break
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        body = message.get("body", b"")
    if inflate is not None:
        decoded += inflate.flush()
        if len(decoded) > limit:
            raise PayloadTooLargeError(too_large(limit, inflated=True))
        if not inflate.eof:
            raise BadRequestError("the compressed body ends early; send the whole of it")
    return bytes(decoded)


def _inflate(inflate: zlib._Decompress, chunk: bytes, decoded: bytearray, limit: int) -> None:
    try:
        decoded += inflate.decompress(chunk, limit + 1 - len(decoded))
    except zlib.error as exc:
        raise BadRequestError(
            f"the body does not decompress as its Content-Encoding says ({exc})"
        ) from None
    if len(decoded) > limit or inflate.unconsumed_tail:
        raise PayloadTooLargeError(too_large(limit, inflated=True))


def too_large(limit: int, *, inflated: bool = False) -> str:
    """The 413 message: the limit, the setting, and what to do."""
    what = "the request body inflates to" if inflated else "the request body is"
    return (
        f"{what} over {limit} bytes (HttpLimits.max_body_bytes); send less, "
        f"or raise the limit on the server"
    )
