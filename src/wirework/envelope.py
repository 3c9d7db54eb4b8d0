"""The CloudEvents 1.0 envelope every wirework message travels in, and its codecs.

On a broker with headers the envelope goes in *binary mode* (attributes as
``ce-*`` headers, the body as raw bytes); where there are no headers it goes in
*structured mode* (one ``application/cloudevents+json`` document). Both are
read back by ``decode_wire``, and both interoperate with the official
``cloudevents`` SDK. Reading is tolerant: unknown attributes are kept as
extensions, and body models ignore fields they do not know.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wirework.errors import DeserializationError, SchemaValidationError

M = TypeVar("M", bound=BaseModel)

JSON_CONTENT_TYPE = "application/json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"

#: CloudEvents context attributes and the wirework extensions, in header order.
CORE_ATTRIBUTES = ("id", "source", "type", "specversion", "time", "subject", "dataschema")
EXTENSIONS = ("correlationid", "causationid", "replyto", "traceparent", "tracestate", "key")
_KNOWN = frozenset((*CORE_ATTRIBUTES, *EXTENSIONS, "datacontenttype", "data", "data_base64"))


@dataclass(frozen=True, slots=True)
class WireMessage:
    """What a broker stores and delivers: string headers and opaque bytes.

    Brokers never look inside; decoding is the consumer middleware's job, so a
    message that cannot be decoded still travels, and can be dead-lettered.
    """

    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def size(self) -> int:
        """Bytes this message occupies, counted the way ``max_message_bytes`` counts."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers.items())

    @property
    def message_id(self) -> str | None:
        """The CloudEvent id, read without decoding the message (binary or structured)."""
        found = self.headers.get("ce-id")
        if found is not None:
            return found
        try:
            document = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        if isinstance(document, dict) and isinstance(document.get("id"), str):
            return document["id"]
        return None


class Envelope(BaseModel):
    """A CloudEvents 1.0 event with wirework's extensions; ``data`` holds the encoded body."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    specversion: Literal["1.0"] = "1.0"
    time: datetime | None = None
    datacontenttype: str | None = JSON_CONTENT_TYPE
    dataschema: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    replyto: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    key: str | None = None
    extensions: Mapping[str, str] = Field(default_factory=dict)
    data: bytes = b""

    @classmethod
    def new(
        cls,
        type: str,  # noqa: A002 - the CloudEvents attribute is called type
        body: BaseModel | None = None,
        *,
        source: str,
        key: str | None = None,
        subject: str | None = None,
        correlationid: str | None = None,
        causationid: str | None = None,
        replyto: str | None = None,
        id: str | None = None,  # noqa: A002 - the CloudEvents attribute is called id
        time: datetime | None = None,
    ) -> Envelope:
        """Make an event around a pydantic body, with a fresh id and correlation.

        A fresh event starts its own correlation (its id) unless one is given.
        """
        event_id = id or uuid.uuid4().hex
        return cls(
            id=event_id,
            source=source,
            type=type,
            time=time or datetime.now(UTC),
            subject=subject,
            key=key,
            correlationid=correlationid or event_id,
            causationid=causationid,
            replyto=replyto,
            data=encode_body(body) if body is not None else b"",
        )

    def decode(self, model: type[M]) -> M:
        """Parse ``data`` into ``model``.

        Raises:
            DeserializationError: the data is not JSON, or not a JSON object.
            SchemaValidationError: the JSON breaks the model; ``field`` points at it.
        """
        return decode_body(self.data, model)


def encode_body(body: BaseModel) -> bytes:
    """Serialize a body with pydantic-core's own JSON writer (no detour through dicts)."""
    return body.model_dump_json(by_alias=True).encode()


def decode_body(data: bytes, model: type[M]) -> M:
    """Parse JSON bytes into ``model``, sorting failures into our two decode errors."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        location = tuple(first["loc"])
        if first["type"] in {"json_invalid", "json_type"} or (
            not location and first["type"] in {"model_type", "dict_type", "model_attributes_type"}
        ):
            raise DeserializationError(
                f"body is not a JSON object for {model.__name__}: {first['msg']}"
            ) from exc
        pointer = "/" + "/".join(str(part) for part in location)
        raise SchemaValidationError(
            f"body breaks {model.__name__} at {pointer}: {first['msg']}", field=pointer
        ) from exc


def _attributes(envelope: Envelope) -> dict[str, str]:
    values: dict[str, str] = {}
    for name in (*CORE_ATTRIBUTES, *EXTENSIONS):
        value = getattr(envelope, name)
        if value is None:
            continue
        values[name] = _format_time(value) if isinstance(value, datetime) else str(value)
    for name, value in envelope.extensions.items():
        values.setdefault(name, value)
    return values


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def encode_binary(envelope: Envelope) -> WireMessage:
    """Binary mode: attributes as ``ce-*`` headers, the body untouched."""
    headers = {f"ce-{name}": value for name, value in _attributes(envelope).items()}
    if envelope.datacontenttype is not None:
        headers["content-type"] = envelope.datacontenttype
    return WireMessage(headers=headers, body=envelope.data)


def encode_structured(envelope: Envelope) -> WireMessage:
    """Structured mode: one JSON document; JSON data inline, other data as base64."""
    document: dict[str, Any] = dict(_attributes(envelope))
    if envelope.datacontenttype is not None:
        document["datacontenttype"] = envelope.datacontenttype
    if envelope.data:
        if _is_json(envelope.datacontenttype):
            try:
                document["data"] = orjson.Fragment(envelope.data)
                body = orjson.dumps(document)
                orjson.loads(body)  # the fragment must itself be valid JSON
            except orjson.JSONDecodeError:
                del document["data"]
                document["data_base64"] = base64.b64encode(envelope.data).decode()
        else:
            document["data_base64"] = base64.b64encode(envelope.data).decode()
    return WireMessage(
        headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=orjson.dumps(document)
    )


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_CONTENT_TYPE or media.endswith("+json") or media == "text/json"


def decode_wire(message: WireMessage) -> Envelope:
    """Read a message in either mode back into an envelope.

    Raises:
        DeserializationError: the message is not a CloudEvent we can read; the
            message says which attribute or byte range is wrong.
    """
    headers = {k.lower(): v for k, v in message.headers.items()}
    content_type = headers.get("content-type", "")
    if "ce-id" in headers or "ce-specversion" in headers:
        return _decode_binary(headers, message.body)
    if content_type.lower().startswith(STRUCTURED_CONTENT_TYPE) or message.body[:1] == b"{":
        return _decode_structured(message.body)
    raise DeserializationError(
        "message is not a CloudEvent: no ce-* headers and the body is not a structured "
        f"CloudEvents JSON document (content-type {content_type or 'missing'!r}, "
        f"{len(message.body)} bytes)"
    )


def _decode_binary(headers: Mapping[str, str], body: bytes) -> Envelope:
    attributes: dict[str, Any] = {}
    extensions: dict[str, str] = {}
    for name, value in headers.items():
        if not name.startswith("ce-"):
            continue
        attribute = name[3:]
        if attribute in _KNOWN:
            attributes[attribute] = value
        else:
            extensions[attribute] = value
    attributes["datacontenttype"] = headers.get("content-type")
    return _build(attributes, extensions, body, where="ce-* headers")


def _decode_structured(body: bytes) -> Envelope:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DeserializationError(f"structured CloudEvent is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise DeserializationError(
            f"structured CloudEvent must be a JSON object, got {type(document).__name__}"
        )
    attributes: dict[str, Any] = {}
    extensions: dict[str, str] = {}
    for name, value in document.items():
        if name in {"data", "data_base64"}:
            continue
        if name in _KNOWN:
            attributes[name] = value
        elif isinstance(value, str | int | bool):
            extensions[name] = str(value).lower() if isinstance(value, bool) else str(value)
    if "data_base64" in document:
        try:
            data = base64.b64decode(document["data_base64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise DeserializationError("structured CloudEvent has invalid data_base64") from exc
    elif "data" in document:
        raw = document["data"]
        data = raw.encode() if isinstance(raw, str) and not _is_json(
            attributes.get("datacontenttype")
        ) else orjson.dumps(raw)
    else:
        data = b""
    return _build(attributes, extensions, data, where="structured document")


def _build(attributes: dict[str, Any], extensions: dict[str, str], data: bytes, *, where: str) -> Envelope:
    try:
        return Envelope.model_validate({**attributes, "extensions": extensions, "data": data})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in first["loc"]) or "envelope"
        raise DeserializationError(
            f"CloudEvent attribute {name!r} in {where} is invalid: {first['msg']}",
            field="/" + name,
        ) from exc
