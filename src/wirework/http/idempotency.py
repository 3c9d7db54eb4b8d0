"""HTTP ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header-07), kept in the store.

An endpoint whose ``idempotency`` is ``optional`` or ``required`` and whose
service has a store gets a ``KeyGuard``. For a request carrying a key it:

1. checks the key (one header, an RFC 8941 sf-string or a bare token, 1-255
   characters: else 400) before the body is read; a ``required`` endpoint
   without one is 400 too. Nothing is stored for a request refused here or
   by the input validation that follows (Stripe: "nothing is saved if
   validation fails"), so fixing the request and sending it again is safe;
2. looks the key up under ``(service.endpoint, client identity, sha256(key))``:
   the identity is the hash of the ``Authorization`` header (configurable),
   or the peer's IP address when there is none, so two clients never see
   each other's answers, however guessable their keys (RELIABILITY.md §3.9);
3. compares the request's fingerprint, a hash of method, path, query and
   body bytes: a different one is 422, whatever the key's state;
4. a new key: writes an in-flight record (a unique constraint settles a race),
   runs the handler, stores its status, selected headers and body, whatever
   the status (a 500 too: the handler began, so its outcome stands), and only
   then answers, so a retry made after the answer arrived always finds it;
5. a finished key: replays the stored answer with ``Idempotent-Replayed: true``
   (Stripe's header); one still in flight: 409, retriable;
6. a finished key older than ``ttl`` (24 h) is a new request; expired records
   are deleted, a bounded batch at a time, by the requests that write new
   ones. An in-flight record older than ``in_flight_timeout`` is taken to be
   a crashed attempt and taken over: the handler runs again, so across a
   crash the endpoint is at-least-once, never blocked for good.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import Message, Send

from wirework.errors import BadRequestError, CallError, ConfigurationError, ConflictError
from wirework.http.problems import send_error
from wirework.service.endpoints import Endpoint
from wirework.service.service import Service
from wirework.store import Store, StoreError

log = logging.getLogger("wirework.http.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
TABLE = "wirework_idempotency_keys"

_HEADER = b"idempotency-key"
_REPLAYED = (b"idempotent-replayed", b"true")
_BARE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~:/]+")
_RUNNING = "running"
_DONE = "done"
_PRUNE_BATCH = 100
#: Headers of an answer kept for its replay; content-length is recomputed, the rest
#: (set-cookie above all) belongs to the first exchange only.
_KEPT_HEADERS = frozenset(
    {
        b"content-type",
        b"content-language",
        b"location",
        b"retry-after",
        b"etag",
        b"last-modified",
        b"link",
        b"cache-control",
    }
)
_NO_BODY_STATUSES = frozenset({204, 304})


class IdempotencySettings(BaseSettings):
    """How ``Idempotency-Key`` records are kept; also read from ``WIREWORK_HTTP_IDEMPOTENCY_*``.

    Durations are seconds.
    """

    model_config = SettingsConfigDict(
        env_prefix="WIREWORK_HTTP_IDEMPOTENCY_", extra="forbid", frozen=True
    )

    ttl: float = Field(default=86400.0, gt=0, allow_inf_nan=False)
    """How long a finished key is replayed (published in the OpenAPI document); then it is new."""
    in_flight_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """After this long unfinished, a key's first attempt is taken for crashed and taken over.

    Keep it above the longest a handler may run: a takeover runs the handler again.
    """
    identity_header: str = Field(default="authorization", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    """The request header naming the client (hashed); without it, the peer's IP address."""
    max_stored_bytes: int = Field(default=1 << 20, ge=0)
    """An answer body larger than this is not stored (RELIABILITY.md §3.7): its key is freed."""


class IdempotencyKeyError(BadRequestError):
    """400: the ``Idempotency-Key`` header is malformed, repeated, or missing where required."""


class IdempotencyKeyInUseError(ConflictError):
    """409: a request with this ``Idempotency-Key`` is still being answered; retry shortly."""

    retriable = True


class IdempotencyKeyReusedError(CallError):
    """422: this ``Idempotency-Key`` was used for a different request (method, path or body)."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


# -- the request's key, identity and fingerprint ------------------------------------


def parse_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Idempotency-Key``, unquoted; None when it sent none.

    Accepts the draft's RFC 8941 sf-string (``"8e03978e-..."``) and, as most
    clients send (Stripe's among them), a bare token of RFC 9110 ``tchar``
    plus ``:`` and ``/``; both name the same key. Parameters, lists and empty
    keys are refused.

    Raises:
        IdempotencyKeyError: two headers, a malformed value, or over 255 characters.
    """
    values = [value for name, value in headers if name == _HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise IdempotencyKeyError(
            f"the request has {len(values)} {HEADER} headers; send exactly one"
        )
    text = values[0].decode("latin-1").strip(" \t")
    key = _unquote(text) if text.startswith('"') else text if _BARE.fullmatch(text) else None
    if key is None:
        raise IdempotencyKeyError(
            f'{HEADER} must be one RFC 8941 sf-string ("..." of printable ASCII, \\" and \\\\ '
            f"escaped) or a bare token of letters, digits and !#$%&'*+-.^_`|~:/, without "
            f'parameters; send a UUID, e.g. "{uuid.uuid4()}"'
        )
    if not key:
        raise IdempotencyKeyError(f"{HEADER} is empty; send a unique value, e.g. a UUID")
    if len(key) > MAX_KEY_CHARS:
        raise IdempotencyKeyError(
            f"{HEADER} has {len(key)} characters, over the limit of {MAX_KEY_CHARS}; "
            f"send a shorter unique value, e.g. a UUID"
        )
    return key


def _unquote(text: str) -> str | None:
    """The content of an sf-string that makes up the whole of ``text``, or None."""
    chars: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 1
            if index >= len(text) or text[index] not in '"\\':
                return None
            chars.append(text[index])
        elif char == '"':
            return "".join(chars) if index == len(text) - 1 else None
        elif not " " <= char <= "~":
            return None
        else:
            chars.append(char)
        index += 1
    return None  # no closing quote


def client_identity(
    headers: Sequence[tuple[bytes, bytes]],
    client: tuple[str, int] | Sequence[Any] | None,
    identity_header: bytes,
) -> str | None:
    """Who is calling, as far as keys are concerned: a hashed header, else the peer's IP.

    The port is left out (a retry comes on a new connection); a header is
    hashed so the store never holds a credential. None when neither is known.
    """
    values = [value for name, value in headers if name == identity_header]
    if values:
        digest = hashlib.sha256(b"\n".join(values)).hexdigest()
        return f"{identity_header.decode('latin-1')}:{digest}"
    if client:
        return f"peer:{client[0]}"
    return None


def fingerprint(method: str, raw_path: bytes, query: bytes, body: bytes) -> str:
    """The hash that tells one request from another sent with the same key."""
    digest = hashlib.sha256()
    for part in (method.encode(), raw_path, query):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()


def key_hash(key: str) -> str:
    """How a key is stored and logged (RELIABILITY.md §3.6: keys act as capabilities)."""
    return hashlib.sha256(key.encode()).hexdigest()


# -- the guard -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A finished request's answer, as replayed."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Claim:
    holder: str
    took_over: bool


_Outcome = StoredAnswer | _Claim | Literal["busy", "mismatch"]


class _Recorder:
    """An ASGI ``send`` that keeps the answer instead of sending it."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    async def forward(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": b"".join(self.chunks)})


class KeyGuard:
    """``Idempotency-Key`` handling for one endpoint (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        service_name: str,
        endpoint: Endpoint,
        settings: IdempotencySettings,
    ) -> None:
        self.store = store
        self.scope = f"{service_name}.{endpoint.name}"
        self.required = endpoint.idempotency == "required"
        self.settings = settings

    def key_of(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The request's key; raises ``IdempotencyKeyError`` (400) as the rules say."""
        key = parse_key(headers)
        if key is None and self.required:
            raise IdempotencyKeyError(
                f"this endpoint requires an {HEADER} header; send a unique value (a UUID) "
                f"and send the same one again when retrying"
            )
        return key

    async def run(
        self,
        key: str,
        identity: str | None,
        request_fingerprint: str,
        respond: Callable[[Send], Awaitable[None]],
        send: Send,
        instance: str,
    ) -> None:
        """Answer through the key: replay, refuse, or run ``respond`` and store its answer."""
        if identity is None:
            raise IdempotencyKeyError(
                f"an {HEADER} cannot be scoped to this caller: the request has no "
                f"{self.settings.identity_header} header and no peer address"
            )
        lookup = (self.scope, identity, key_hash(key))
        outcome = await self._begin(lookup, request_fingerprint)
        if isinstance(outcome, StoredAnswer):
            await _replay(outcome, send)
            return
        if outcome == "busy":
            raise IdempotencyKeyInUseError(
                f"a request with this {HEADER} is still being answered; retry with the same "
                f"key shortly to get its answer"
            )
        if outcome == "mismatch":
            raise IdempotencyKeyReusedError(
                f"this {HEADER} was used for a different request (method, path, query or "
                f"body); send a new key for a new request, the same request for a retry"
            )
        if outcome.took_over:
            log.warning(
                "%s: taking over Idempotency-Key %s…, unfinished after %.0f s (a crashed "
                "attempt?); running the handler again",
                self.scope,
                lookup[2][:12],
                self.settings.in_flight_timeout,
            )
        recorder = _Recorder()
        try:
            await respond(recorder)
        except Exception as error:  # the handler began: its error is its answer, and stored
            await send_error(recorder, error, instance)
        await self._finish(lookup, outcome.holder, recorder)
        await recorder.forward(send)

    async def _begin(self, lookup: tuple[str, str, str], request_fingerprint: str) -> _Outcome:
        holder = uuid.uuid4().hex
        settings = self.settings
        async with self.store.transaction() as tx:
            now = await self.store.now(tx)
            fresh = (
                request_fingerprint,
                _RUNNING,
                holder,
                now,
                now + settings.in_flight_timeout,
                now + max(settings.ttl, settings.in_flight_timeout),
            )
            inserted = await tx.execute(
                f"INSERT INTO {TABLE} (endpoint, client, key_hash, fingerprint, state, holder,"
                " started_at, lease_until, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (endpoint, client, key_hash) DO NOTHING",
                *lookup,
                *fresh,
            )
            if inserted:
                await _prune(tx, now)
                return _Claim(holder, took_over=False)
            row = await tx.fetchrow(
                f"SELECT fingerprint, state, holder, lease_until, expires_at, status, headers,"
                f" body FROM {TABLE} WHERE endpoint = $1 AND client = $2 AND key_hash = $3",
                *lookup,
            )
            if row is None:
                return "busy"  # deleted since the insert saw it: let the client retry
            expired = row["state"] == _DONE and row["expires_at"] <= now
            stale = row["state"] == _RUNNING and row["lease_until"] <= now
            if not expired and row["fingerprint"] != request_fingerprint:
                return "mismatch"
            if not expired and not stale:
                if row["state"] == _RUNNING:
                    return "busy"
                return StoredAnswer(
                    status=int(row["status"]),
                    headers=[
                        (name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in orjson.loads(row["headers"])
                    ],
                    body=bytes(row["body"]),
                )
            changed = await tx.execute(
                f"UPDATE {TABLE} SET fingerprint = $4, state = $5, holder = $6, started_at = $7,"
                " lease_until = $8, expires_at = $9, status = NULL, headers = NULL, body = NULL"
                " WHERE endpoint = $1 AND client = $2 AND key_hash = $3 AND holder = $10",
                *lookup,
                *fresh,
                row["holder"],
            )
            return _Claim(holder, took_over=stale) if changed else "busy"

    async def _finish(self, lookup: tuple[str, str, str], holder: str, answer: _Recorder) -> None:
        """Store the answer, or free the key when it is too large to keep.

        A store failure here is logged, not answered: the handler's outcome
        stands and goes to the client; the record stays in flight until it is
        taken over, as after a crash.
        """
        body = b"".join(answer.chunks)
        where = "endpoint = $1 AND client = $2 AND key_hash = $3 AND holder = $4"
        try:
            async with self.store.transaction() as tx:
                if len(body) > self.settings.max_stored_bytes:
                    log.warning(
                        "%s: the answer to Idempotency-Key %s… is %d bytes, over "
                        "max_stored_bytes=%d; not stored, the key is free again",
                        self.scope,
                        lookup[2][:12],
                        len(body),
                        self.settings.max_stored_bytes,
                    )
                    await tx.execute(f"DELETE FROM {TABLE} WHERE {where}", *lookup, holder)
                    return
                kept = [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in answer.headers
                    if name.lower() in _KEPT_HEADERS
                ]
                now = await self.store.now(tx)
                changed = await tx.execute(
                    f"UPDATE {TABLE} SET state = $5, status = $6, headers = $7, body = $8,"
                    f" expires_at = $9 WHERE {where}",
                    *lookup,
                    holder,
                    _DONE,
                    answer.status,
                    orjson.dumps(kept).decode(),
                    body,
                    now + self.settings.ttl,
                )
        except StoreError as error:
            log.error(
                "%s: could not store the answer to Idempotency-Key %s… (%s); it stays in "
                "flight until taken over after %.0f s",
                self.scope,
                lookup[2][:12],
                error,
                self.settings.in_flight_timeout,
            )
            return
        if not changed:
            log.warning(
                "%s: Idempotency-Key %s… was taken over while its handler ran (it outlived "
                "in_flight_timeout=%.0f s); this answer is not the stored one",
                self.scope,
                lookup[2][:12],
                self.settings.in_flight_timeout,
            )


async def _prune(tx: Any, now: float) -> None:
    """Delete a batch of expired records: each new record pays for a few old ones."""
    # PostgreSQL: skip rows another transaction holds, so two prunes never wait on each other.
    lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
    await tx.execute(
        f"DELETE FROM {TABLE} WHERE (endpoint, client, key_hash) IN (SELECT endpoint, client,"
        f" key_hash FROM {TABLE} WHERE expires_at <= $1 LIMIT {_PRUNE_BATCH}{lock})",
        now,
    )


async def _replay(answer: StoredAnswer, send: Send) -> None:
    headers = list(answer.headers)
    if answer.status not in _NO_BODY_STATUSES:
        headers.append((b"content-length", str(len(answer.body)).encode()))
    headers.append(_REPLAYED)
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


# -- wiring ----------------------------------------------------------------------------


def key_guard(
    service: Service, endpoint: Endpoint, settings: IdempotencySettings
) -> KeyGuard | None:
    """The endpoint's guard, or None when it takes no keys or its service has no store.

    An ``optional`` endpoint of a service without a store is served without
    key storage (the key still reaches the handler as ``ctx.idempotency_key``);
    a ``required`` one cannot be.

    Raises:
        ConfigurationError: a ``required`` endpoint whose service has no store.
    """
    if endpoint.idempotency == "off" or not endpoint.http:
        return None
    try:
        store = service.store
    except ConfigurationError as error:
        if endpoint.idempotency == "required":
            raise ConfigurationError(
                f"endpoint {endpoint.qualname} requires an {HEADER}, whose answers are kept "
                f"in the store, but service {service.name!r} has none: pass "
                f"store='sqlite:///app.db' (or a Store) to Service(), or set WIREWORK_STORE"
            ) from error
        log.info(
            "%s %s is served without %s storage: service %r has no store; the key only "
            "reaches the handler",
            endpoint.method,
            endpoint.path,
            HEADER,
            service.name,
        )
        return None
    return KeyGuard(store, service_name=service.name, endpoint=endpoint, settings=settings)


def openapi_parameter(endpoint: Endpoint, settings: IdempotencySettings) -> dict[str, Any]:
    """The header parameter that publishes the key rules and expiry (the draft's MUST)."""
    return {
        "name": HEADER,
        "in": "header",
        "required": endpoint.idempotency == "required",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS + 2},
        "description": (
            f"Makes a retry safe (draft-ietf-httpapi-idempotency-key-header). An RFC 8941 "
            f"sf-string (or a bare token) of at most {MAX_KEY_CHARS} characters, unique per "
            f"request, scoped to the caller. The first request's answer, success or error, is "
            f"stored and replayed to a retry with the same key and request, with "
            f"`{REPLAYED_HEADER}: true`. Keys expire {_duration(settings.ttl)} after their "
            f"answer; an expired key is a new request. 409 while the first request is in "
            f"flight; 422 for the same key with a different request; 400 for an invalid key"
            + (" or a missing one." if endpoint.idempotency == "required" else ".")
        ),
    }


OPENAPI_RESPONSES: dict[str, str] = {
    "400": f"The {HEADER} header is invalid, repeated or missing.",
    "409": f"A request with this {HEADER} is still in flight; retry with the same key.",
    "422": f"This {HEADER} was used for a different request.",
}


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h ({seconds:g} s)"
    return f"{seconds:g} s"
