"""How the NATS backend names things on the server and carries a message in headers.

Every stream, consumer and subject starts with the namespace, so applications
and tests sharing a server never collide and ``purge_namespace`` finds all of
a namespace with one subject filter (``<ns>.>``).

Topic and group names may hold ``.``, which NATS uses to separate subject
tokens and forbids in stream and consumer names. They are escaped reversibly
(``_`` becomes ``_u``, ``.`` becomes ``_d``); an escaped name never contains
``__``, so ``__`` separates the parts of a stream name unambiguously.

Subjects of a topic's stream have three tokens after the topic, so one
wildcard filter selects what a lookup needs::

    <ns>.t.<topic>.<kind>.<addr>.<key>
      kind  n: published now, d: published with a delay, r: replayed
      addr  a: every group, g<group>: one group (replays)
      key   n: no key, k<base64url of the key>, h<sha256> for long keys

Message headers cross NATS as headers where NATS carries them unchanged
(a token name, a printable value without surrounding space, not a name NATS
or wirework reserves); any other header travels in ``Wirework-Headers`` as
JSON, so every ``WireMessage`` comes back exactly as it was published.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from wirework.envelope import WireMessage

Kind = Literal["n", "d", "r"]

#: Longest stream or consumer name built from a readable escape; longer ones are hashed
#: (the name is a directory on the server, and the real name is kept in its description).
_MAX_NAME = 128

#: Keys up to this many UTF-8 bytes are kept readable (base64url) in the subject.
_MAX_KEY_BYTES = 96

H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_STREAM = "Nats-Expected-Stream"
H_KEY = "Wirework-Key"
H_NOT_BEFORE = "Wirework-Not-Before"
H_EXTRA = "Wirework-Headers"
H_DEAD_LETTER = "Wirework-Dead-Letter"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL_PREFIXES = ("nats-", "wirework-")
# Status headers mark server replies (no messages, timeouts); never send them natively.
_RESERVED = frozenset({"status", "description"})

#: Name of the consumer that keeps a topic's messages while it has no group yet.
KEEPER = "KEEP"


def escape(name: str) -> str:
    """A topic, group or namespace name as one subject token / part of a stream name."""
    return name.replace("_", "_u").replace(".", "_d")


def unescape(token: str) -> str:
    """The name ``escape`` made ``token`` from."""
    out: list[str] = []
    chars = iter(token)
    for char in chars:
        if char == "_":
            out.append("_" if next(chars, "u") == "u" else ".")
        else:
            out.append(char)
    return "".join(out)


def key_token(key: str | None) -> str:
    """The subject token of a message key (every key, however long, gets a valid token)."""
    if key is None:
        return "n"
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= _MAX_KEY_BYTES:
        return "k" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return "h" + hashlib.sha256(raw).hexdigest()[:48]


def _bounded(name: str, prefix: str, real: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    return f"{prefix}__H__{hashlib.sha256(real.encode()).hexdigest()[:40]}"


@dataclass(frozen=True)
class Names:
    """Every server-side name of one namespace."""

    namespace: str

    @property
    def root(self) -> str:
        return escape(self.namespace)

    @property
    def everything(self) -> str:
        """The subject filter every stream of this namespace lies under."""
        return f"{self.root}.>"

    @property
    def dlq_stream(self) -> str:
        return f"{self.root}__DLQ"

    @property
    def state_stream(self) -> str:
        return f"{self.root}__STATE"

    @property
    def keys_stream(self) -> str:
        return f"{self.root}__KEYS"

    def topic_stream(self, topic: str) -> str:
        return _bounded(f"{self.root}__T__{escape(topic)}", f"{self.root}__T", topic)

    @staticmethod
    def consumer(group: str) -> str:
        return _bounded(f"G__{escape(group)}", "G", group)

    # -- subjects -----------------------------------------------------------------------

    @property
    def topics_filter(self) -> str:
        return f"{self.root}.t.>"

    def topic_filter(self, topic: str) -> str:
        return f"{self.root}.t.{escape(topic)}.>"

    def message_subject(
        self, topic: str, key: str | None, *, kind: Kind = "n", group: str | None = None
    ) -> str:
        addr = "a" if group is None else f"g{escape(group)}"
        return f"{self.root}.t.{escape(topic)}.{kind}.{addr}.{key_token(key)}"

    def key_filter(self, topic: str, token: str) -> str:
        return f"{self.root}.t.{escape(topic)}.*.*.{token}"

    def kind_filter(self, topic: str, kind: Kind) -> str:
        return f"{self.root}.t.{escape(topic)}.{kind}.>"

    def dlq_subject(self, topic: str, group: str, reason: str) -> str:
        return f"{self.root}.dlq.{escape(topic)}.{escape(group)}.{reason}"

    def dlq_filter(self, topic: str | None, group: str | None, reason: str | None) -> str:
        parts = [escape(topic) if topic else "*", escape(group) if group else "*", reason or "*"]
        return f"{self.root}.dlq.{'.'.join(parts)}"

    def state_subject(self, topic: str, group: str, seq: int) -> str:
        return f"{self.root}.s.{escape(topic)}.{escape(group)}.{seq}"

    def state_filter(self, topic: str, group: str) -> str:
        return f"{self.root}.s.{escape(topic)}.{escape(group)}.*"

    def cursor_subject(self, topic: str, group: str, token: str) -> str:
        return f"{self.root}.k.{escape(topic)}.{escape(group)}.{token}"

    def notify_subject(self, topic: str, group: str) -> str:
        """Core NATS (not stored): a key of the group was settled; waiters look again."""
        return f"{self.root}.kn.{escape(topic)}.{escape(group)}"


@dataclass(frozen=True)
class Address:
    """What the last three tokens of a message subject say."""

    kind: str
    group: str | None
    key_token: str


def parse_subject(subject: str) -> Address:
    kind, addr, token = subject.rsplit(".", 3)[-3:]
    group = unescape(addr[1:]) if addr.startswith("g") else None
    return Address(kind, group, token)


def parse_dlq_subject(subject: str) -> tuple[str, str, str]:
    """(topic, group, reason) of a dead-letter subject."""
    topic, group, reason = subject.rsplit(".", 3)[-3:]
    return unescape(topic), unescape(group), reason


# -- headers --------------------------------------------------------------------------------

#: Whether a header name may travel natively, by name: a process sees few distinct names,
#: and the check (a regular expression, a lower-casing) ran for every header of every
#: message. Bounded, so that a stream of random names cannot grow it without end.
_NATIVE_NAMES: dict[str, bool] = {}
_NATIVE_NAMES_MAX = 4096

#: Bytes of a header block (``header_block``) that are not header lines: the
#: ``NATS/1.0`` line and the blank line ending the block.
BLOCK_FRAME = len(b"NATS/1.0\r\n\r\n")


def _native_name(name: str) -> bool:
    native = _NATIVE_NAMES.get(name)
    if native is None:
        lower = name.lower()
        native = (
            _TOKEN.fullmatch(name) is not None
            and not lower.startswith(_CONTROL_PREFIXES)
            and lower not in _RESERVED
        )
        if len(_NATIVE_NAMES) < _NATIVE_NAMES_MAX:
            _NATIVE_NAMES[name] = native
    return native


def _native(name: str, value: str) -> bool:
    return _native_name(name) and value.isprintable() and value == value.strip()


def _json(value: object) -> str:
    # ASCII only: a header value must survive nats-py's strip and CR/LF rules untouched.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def encode_headers(message: WireMessage, control: Mapping[str, str]) -> dict[str, str]:
    """The NATS headers for a message: its own (natively or in JSON) plus ``control``."""
    headers: dict[str, str] = {}
    extra: list[list[str]] = []
    for name, value in message.headers.items():
        if _native(name, value):
            headers[name] = value
        else:
            extra.append([name, value])
    if extra:
        headers[H_EXTRA] = _json(extra)
    headers.update(control)
    return headers


def header_block(message: WireMessage, control: Mapping[str, str]) -> bytes:
    """The NATS header block of a message (``NATS/1.0``, ``name: value`` lines, a blank line),
    with the same headers as ``encode_headers`` and the bytes nats-py would write for them.

    Publishing hands this block to ``nats_client`` as it is, so the headers are checked
    and encoded once, here, instead of once here and once more in nats-py.
    """
    lines = ["NATS/1.0\r\n"]
    extra: list[list[str]] = []
    for name, value in message.headers.items():
        if _native(name, value):
            lines.append(f"{name}: {value}\r\n")
        else:
            extra.append([name, value])
    if extra:
        lines.append(f"{H_EXTRA}: {_json(extra)}\r\n")
    for name, value in control.items():
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def decode_headers(raw: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(the message's own headers, the control headers) of a stored message."""
    own: dict[str, str] = {}
    control: dict[str, str] = {}
    for name, value in (raw or {}).items():
        name = str(name)  # nats-py may hand back a str enum for Description
        if name.lower().startswith(_CONTROL_PREFIXES):
            control[name] = value
        else:
            own[name] = value
    if H_EXTRA in control:
        for name, value in json.loads(control[H_EXTRA]):
            own[name] = value
    return own, control


def header_bytes(headers: Mapping[str, str]) -> int:
    """Bytes the headers take on the wire (``name: value`` lines)."""
    return sum(len(name.encode()) + len(value.encode()) + 4 for name, value in headers.items())


def key_header(key: str) -> str:
    return _json(key)


def read_key(control: Mapping[str, str]) -> str | None:
    raw = control.get(H_KEY)
    if raw is None:
        return None
    key = json.loads(raw)
    return key if isinstance(key, str) else None


def dump_json(value: object) -> str:
    """A JSON header value (ASCII, no line breaks)."""
    return _json(value)
