"""The CloudEvents envelope: SDK interop both ways, round trips, tolerant and safe reading."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import conversion as ce_legacy
from cloudevents.v1.http import CloudEvent as LegacyCloudEvent
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wirework.envelope import (
    JSON_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    Envelope,
    WireMessage,
    decode_body,
    decode_wire,
    encode_binary,
    encode_structured,
)
from wirework.errors import DecodeError, DeserializationError, SchemaValidationError

Encoder = Callable[[Envelope], WireMessage]
ENCODERS = pytest.mark.parametrize(
    "encode", [encode_binary, encode_structured], ids=["binary", "structured"]
)
SDK_MODES = pytest.mark.parametrize(
    "to_message",
    [ce_http.to_binary_event, ce_http.to_structured_event],
    ids=["binary", "structured"],
)


class Line(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    order_id: str
    total_cents: int
    lines: list[Line] = []


class StrictOrder(Order):
    model_config = ConfigDict(extra="forbid")


class Tagged(BaseModel):
    code: int | list[int]


class Odd(BaseModel):
    value: int = Field(alias="a/b~c")


ORDER = Order(order_id="o-42", total_cents=1999, lines=[Line(sku="A", qty=2), Line(sku="B", qty=1)])
ORDER_JSON: dict[str, Any] = ORDER.model_dump(mode="json")
MOMENT = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
OUR_EXTENSIONS = {
    "correlationid": "corr-1",
    "causationid": "cause-0",
    "replyto": "replies.orders",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    "key": "customer 7/é",
}
# Everything a wirework event may carry, with values that need percent-encoding in headers.
ATTRIBUTES: dict[str, Any] = {
    "id": "evt-1",
    "source": "/shop/orders",
    "type": "com.example.order.placed",
    "subject": 'order 42: "rush" 100% ünïcode',
    "time": MOMENT,
    "dataschema": "https://example.com/schemas/order.json",
    **OUR_EXTENSIONS,
    "tenant": "acme",
}


def sdk_event(data: dict[str, Any] | str | bytes | None, **overrides: Any) -> CloudEvent:
    return CloudEvent({**ATTRIBUTES, **overrides}, data)


def full_envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        **{name: value for name, value in ATTRIBUTES.items() if name != "tenant"},
        "extensions": {"tenant": "acme"},
        "data": ORDER.model_dump_json().encode(),
        **overrides,
    }
    return Envelope(**fields)


def to_wire(message: ce_http.HTTPMessage) -> WireMessage:
    return WireMessage(headers=message.headers, body=message.body)


def to_http(message: WireMessage) -> ce_http.HTTPMessage:
    return ce_http.HTTPMessage(headers=dict(message.headers), body=message.body)


def assert_has_all_attributes(envelope: Envelope) -> None:
    for name, value in ATTRIBUTES.items():
        if name == "tenant":
            assert envelope.extensions == {"tenant": "acme"}
        else:
            assert getattr(envelope, name) == value, name
    assert envelope.specversion == "1.0"


def structured(document: Mapping[str, Any]) -> WireMessage:
    return WireMessage(
        headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=orjson.dumps(document)
    )


MINIMAL = {"id": "evt-1", "source": "/test", "type": "t", "specversion": "1.0"}
MINIMAL_HEADERS = {f"ce-{name}": value for name, value in MINIMAL.items()}


# --- the official SDK writes, wirework reads ---------------------------------------------


@SDK_MODES
def test_sdk_json_event_is_read_with_every_attribute(
    to_message: Callable[[CloudEvent], ce_http.HTTPMessage],
) -> None:
    """An SDK event with JSON data keeps every attribute, our extensions and its body."""
    message = to_message(sdk_event(ORDER_JSON, datacontenttype=JSON_CONTENT_TYPE))

    envelope = decode_wire(to_wire(message))

    assert_has_all_attributes(envelope)
    assert envelope.datacontenttype == JSON_CONTENT_TYPE
    assert envelope.decode(Order) == ORDER


@SDK_MODES
def test_sdk_binary_data_is_read_byte_for_byte(
    to_message: Callable[[CloudEvent], ce_http.HTTPMessage],
) -> None:
    """Non-JSON, non-UTF-8 data (data_base64 in structured mode) arrives unchanged."""
    payload = bytes(range(256))
    message = to_message(sdk_event(payload, datacontenttype="application/octet-stream"))

    envelope = decode_wire(to_wire(message))

    assert_has_all_attributes(envelope)
    assert envelope.datacontenttype == "application/octet-stream"
    assert envelope.data == payload


def test_sdk_structured_base64_is_used_for_bytes() -> None:
    """The SDK really writes data_base64 for bytes, so the test above covers that path."""
    message = ce_http.to_structured_event(sdk_event(b"\x00\xff", datacontenttype="image/png"))

    assert "data_base64" in orjson.loads(message.body)
    assert decode_wire(to_wire(message)).data == b"\x00\xff"


@SDK_MODES
def test_sdk_text_data_is_read_as_utf8(
    to_message: Callable[[CloudEvent], ce_http.HTTPMessage],
) -> None:
    """Text data under a non-JSON content type arrives as its UTF-8 bytes."""
    message = to_message(sdk_event("héllo, wörld", datacontenttype="text/plain; charset=utf-8"))

    assert decode_wire(to_wire(message)).data == "héllo, wörld".encode()


@SDK_MODES
def test_sdk_event_without_data_has_empty_data(
    to_message: Callable[[CloudEvent], ce_http.HTTPMessage],
) -> None:
    """An SDK event with no data decodes to an envelope with empty data."""
    envelope = decode_wire(to_wire(to_message(sdk_event(None))))

    assert_has_all_attributes(envelope)
    assert envelope.data == b""


def test_sdk_structured_big_integers_are_not_rounded() -> None:
    """Integers beyond 64 bits in SDK-written JSON data keep every digit."""
    big = 2**70 + 1
    message = ce_http.to_structured_event(sdk_event({"n": big}))

    envelope = decode_wire(to_wire(message))

    assert json.loads(envelope.data) == {"n": big}  # stdlib json: exact big integers


@pytest.mark.parametrize("convert", [ce_legacy.to_binary, ce_legacy.to_structured])
def test_sdk_legacy_v1_api_event_is_read(
    convert: Callable[[LegacyCloudEvent], tuple[dict[str, str], bytes]],
) -> None:
    """Events from the SDK's v1 compatibility API (older deployed services) are read too."""
    legacy = LegacyCloudEvent(
        {
            **{name: value for name, value in ATTRIBUTES.items() if name != "time"},
            "subject": "order-42",  # the v1 API writes headers without percent-encoding
            "key": "customer-7",
            "time": "2026-03-04T07:06:07.123456+02:00",
        },
        ORDER_JSON,
    )
    headers, body = convert(legacy)

    envelope = decode_wire(WireMessage(headers=headers, body=body))

    assert envelope.id == "evt-1"
    assert envelope.subject == "order-42"
    assert envelope.time == MOMENT
    assert envelope.traceparent == OUR_EXTENSIONS["traceparent"]
    assert envelope.extensions == {"tenant": "acme"}
    assert envelope.decode(Order) == ORDER


# --- wirework writes, the official SDK reads ---------------------------------------------


@ENCODERS
def test_sdk_reads_our_json_event(encode: Encoder) -> None:
    """Our event is read by the SDK with the same attributes, extensions and JSON data."""
    event = ce_http.from_http_event(to_http(encode(full_envelope())))

    for name, value in ATTRIBUTES.items():
        assert event.get_attributes()[name] == value, name
    assert event.get_specversion() == "1.0"
    assert event.get_datacontenttype() == JSON_CONTENT_TYPE
    assert event.get_data() == ORDER_JSON


@ENCODERS
def test_sdk_reads_our_binary_data(encode: Encoder) -> None:
    """Our non-JSON data reaches the SDK as the same bytes."""
    payload = b"\x89PNG\r\n\x1a\n\x00\xff"
    envelope = full_envelope(datacontenttype="image/png", data=payload)

    event = ce_http.from_http_event(to_http(encode(envelope)))

    assert event.get_data() == payload
    assert event.get_subject() == ATTRIBUTES["subject"]


def test_sdk_legacy_v1_api_reads_our_structured_event() -> None:
    """The SDK's v1 compatibility API reads our structured events too."""
    message = encode_structured(full_envelope())

    event = ce_legacy.from_http(LegacyCloudEvent, dict(message.headers), message.body)

    assert event["id"] == "evt-1"
    assert event["subject"] == ATTRIBUTES["subject"]
    assert event["traceparent"] == OUR_EXTENSIONS["traceparent"]
    assert event["tenant"] == "acme"
    assert event.get_data() == ORDER_JSON


def test_binary_headers_are_percent_encoded_ascii() -> None:
    """Binary-mode header values are ASCII, percent-encoded as the HTTP binding says."""
    headers = encode_binary(full_envelope()).headers

    assert all(value.isascii() and " " not in value for value in headers.values())
    assert headers["ce-subject"] == "order%2042:%20%22rush%22%20100%25%20%C3%BCn%C3%AFcode"
    assert headers["ce-tracestate"] == OUR_EXTENSIONS["tracestate"]  # nothing to escape


# --- Envelope.new builds without pydantic when it may: the same envelope, the same refusals ---


def _validated(**values: Any) -> Envelope:
    """What ``Envelope.new`` made before it skipped validation: the model's own constructor."""
    return Envelope(**values)


NEW_ARGUMENTS: list[dict[str, Any]] = [
    {},
    {"key": "k-1", "subject": "order 42", "replyto": "inbox.1"},
    {"correlationid": "c-1", "causationid": "e-0", "id": "e-1"},
    {"time": datetime(2026, 11, 27, 13, 0, tzinfo=timezone(timedelta(hours=2)))},
    {"time": datetime(2026, 11, 27, 13, 0)},  # naive: taken to be UTC
    {"extensions": {"tenant": "acme"}},
]


@pytest.mark.parametrize("arguments", NEW_ARGUMENTS)
def test_new_makes_what_validation_makes(arguments: dict[str, Any]) -> None:
    """Equal values, the same types, the same fields set: nothing tells the fast path apart."""
    made = Envelope.new("shop.order.placed", ORDER, source="/shop", **arguments)
    expected = _validated(
        id=made.id,
        source="/shop",
        type="shop.order.placed",
        time=made.time,
        subject=arguments.get("subject"),
        key=arguments.get("key"),
        correlationid=arguments.get("correlationid", made.id),
        causationid=arguments.get("causationid"),
        replyto=arguments.get("replyto"),
        data=ORDER.model_dump_json().encode(),
        **({"extensions": arguments["extensions"]} if "extensions" in arguments else {}),
    )

    assert made == expected
    assert made.model_dump() == expected.model_dump()
    assert made.model_fields_set == expected.model_fields_set
    assert made.time is not None
    assert made.time.tzinfo is not None
    if "time" in arguments and arguments["time"].tzinfo is None:
        assert made.time == arguments["time"].replace(tzinfo=UTC)


def test_new_ids_are_version_4_uuids() -> None:
    ids = {Envelope.new("t", source="/s").id for _ in range(1000)}

    assert len(ids) == 1000
    for event_id in ids:
        parsed = uuid.UUID(hex=event_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == event_id


def test_new_keeps_its_own_copy_of_the_extensions() -> None:
    extensions = {"tenant": "acme"}
    made = Envelope.new("t", source="/s", extensions=extensions)
    extensions["tenant"] = "changed"

    assert made.extensions == {"tenant": "acme"}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"type": ""}, "type"),
        ({"source": ""}, "source"),
        ({"type": 42}, "type"),
        ({"key": 7}, "key"),
        ({"replyto": b"inbox"}, "replyto"),  # pydantic makes it "inbox"
        ({"time": "2026-11-27T13:00:00Z"}, "time"),  # pydantic parses it
        ({"extensions": {"tenant": 1}}, "extensions"),
    ],
)
def test_new_treats_ill_typed_arguments_as_validation_does(
    arguments: dict[str, Any], field: str
) -> None:
    """Ill-typed arguments go through pydantic: refused as it refuses, or made as it makes them."""
    values: dict[str, Any] = {"type": "t", "source": "/s", **arguments}
    type_ = values.pop("type")
    try:
        expected = Envelope(type=type_, id="e", **values)
    except ValidationError:
        with pytest.raises(ValidationError):
            Envelope.new(type_, **values)
    else:
        made = Envelope.new(type_, **values)
        assert getattr(made, field) == getattr(expected, field)


def test_binary_values_are_escaped_when_any_one_needs_it() -> None:
    """One match over all values decides; each value is then escaped on its own."""
    headers = encode_binary(Envelope.new("t", source="/s", subject="a b", key="plain")).headers

    assert headers["ce-subject"] == "a%20b"
    assert headers["ce-key"] == "plain"
    assert headers["ce-type"] == "t"


# --- round trips ---------------------------------------------------------------------------


@ENCODERS
@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        (JSON_CONTENT_TYPE, ORDER.model_dump_json().encode()),
        ("application/octet-stream", bytes(range(256))),
        ("text/plain", "plain text, ünïcode".encode()),
        (JSON_CONTENT_TYPE, b""),
        (None, b'{"untyped":true}'),
    ],
    ids=["json", "bytes", "text", "empty", "no-content-type"],
)
def test_round_trip_keeps_the_envelope(
    encode: Encoder, content_type: str | None, data: bytes
) -> None:
    """Encoding then decoding gives back an equal envelope, whatever the data."""
    envelope = full_envelope(datacontenttype=content_type, data=data)

    assert decode_wire(encode(envelope)) == envelope


def test_round_trip_across_modes() -> None:
    """binary -> envelope -> structured -> envelope -> binary loses nothing."""
    envelope = full_envelope()

    via_structured = decode_wire(encode_structured(decode_wire(encode_binary(envelope))))

    assert via_structured == envelope
    assert encode_binary(via_structured) == encode_binary(envelope)


def test_structured_json_data_is_inlined_not_base64() -> None:
    """JSON data is written as a JSON value in structured mode, readable by any JSON tool."""
    document = orjson.loads(encode_structured(full_envelope()).body)

    assert document["data"] == ORDER_JSON
    assert "data_base64" not in document


@pytest.mark.parametrize(
    "data",
    [b'1,"type":"evil.type"', b'{"a":1}{"b":2}', b"{not json", b"\xff\xfe"],
    ids=["injection", "two-values", "broken", "not-utf8"],
)
def test_structured_never_inlines_data_that_is_not_one_json_value(data: bytes) -> None:
    """Data labelled JSON but not one JSON value goes as base64, so it cannot add attributes."""
    envelope = full_envelope(data=data)

    message = encode_structured(envelope)

    assert "data_base64" in orjson.loads(message.body)
    assert decode_wire(message) == envelope


def test_extensions_cannot_override_attributes_or_data() -> None:
    """An extension named like a context attribute or data is not written over it."""
    envelope = full_envelope(extensions={"type": "evil", "data": "x", "tenant": "acme"}, data=b"")

    for encode in (encode_binary, encode_structured):
        back = decode_wire(encode(envelope))
        assert back.type == ATTRIBUTES["type"]
        assert back.data == b""
        assert back.extensions == {"tenant": "acme"}


@pytest.mark.parametrize("value", ["100%", "%41 literal", 'quote " and space', "日本語", "a+b=c"])
def test_header_values_survive_percent_encoding(value: str) -> None:
    """Values with %, quotes, spaces or non-ASCII come back exactly from binary mode."""
    envelope = full_envelope(subject=value, key=value, extensions={"note": value})

    assert decode_wire(encode_binary(envelope)) == envelope


# --- tolerant reading ----------------------------------------------------------------------


def test_binary_unknown_extensions_are_kept_and_other_headers_ignored() -> None:
    """Unknown ce-* headers become extensions; non-CloudEvents headers are ignored."""
    headers = {
        **MINIMAL_HEADERS,
        "ce-tenant": "acme",
        "ce-priority": "5",
        "x-broker-delivery": "17",
        "content-type": JSON_CONTENT_TYPE,
    }

    envelope = decode_wire(WireMessage(headers=headers, body=b"{}"))

    assert envelope.extensions == {"tenant": "acme", "priority": "5"}


def test_structured_unknown_extensions_are_kept_as_strings() -> None:
    """Unknown scalar members become string extensions; non-scalar ones are dropped."""
    document = {**MINIMAL, "tenant": "acme", "priority": 5, "urgent": True, "meta": {"a": 1}}

    envelope = decode_wire(structured(document))

    assert envelope.extensions == {"tenant": "acme", "priority": "5", "urgent": "true"}


def test_header_names_are_case_insensitive() -> None:
    """Ce-Id, CE-SOURCE and Content-Type are read like their lower-case forms."""
    headers = {
        "Ce-Id": "evt-1",
        "CE-SOURCE": "/test",
        "Ce-Type": "t",
        "Ce-Specversion": "1.0",
        "Content-Type": "text/plain",
    }

    envelope = decode_wire(WireMessage(headers=headers, body=b"x"))

    assert (envelope.id, envelope.source, envelope.datacontenttype) == (
        "evt-1",
        "/test",
        "text/plain",
    )
    assert WireMessage(headers=headers, body=b"x").message_id == "evt-1"


def test_body_models_ignore_unknown_fields() -> None:
    """A producer's new optional field does not break an older consumer's model."""
    body = orjson.dumps(
        {**ORDER_JSON, "coupon": "SPRING", "lines": [{"sku": "A", "qty": 2, "x": 1}]}
    )

    assert decode_body(body, Order) == Order(
        order_id="o-42", total_cents=1999, lines=[Line(sku="A", qty=2)]
    )


def test_structured_document_with_leading_whitespace_and_no_content_type() -> None:
    """A structured document is recognised by its opening brace, whitespace allowed."""
    assert decode_wire(WireMessage(body=b"\n  " + orjson.dumps(MINIMAL))).id == "evt-1"


def test_structured_null_data_means_no_data() -> None:
    """Data that is JSON null is read as no data, as the SDK does, not as the text null."""
    assert decode_wire(structured({**MINIMAL, "data": None})).data == b""


def test_structured_json_string_data_stays_a_json_string() -> None:
    """A JSON string as data under a JSON content type is kept as a JSON value."""
    envelope = decode_wire(
        structured({**MINIMAL, "datacontenttype": JSON_CONTENT_TYPE, "data": "hi"})
    )

    assert envelope.data == b'"hi"'


# --- malformed input (DEV-08) ---------------------------------------------------------------

MALFORMED = pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"order_id": "o-1", "total_ce', "EOF while parsing"),
        (b'{"order_id": "\xff\xfe"}', "not valid UTF-8 (byte 0xff at offset 14)"),
        (b"", "empty"),
        (b"null", "got null"),
        (b"[1, 2]", "got an array"),
        (b"\x00", "control byte 0x00 at offset 0"),
    ],
    ids=["truncated", "invalid-utf8", "empty", "null", "array", "nul-byte"],
)


@MALFORMED
def test_malformed_body_of_a_binary_event_fails_to_decode(body: bytes, problem: str) -> None:
    """A binary event's malformed body travels, and decoding it raises a precise error."""
    envelope = decode_wire(WireMessage(headers=MINIMAL_HEADERS, body=body))

    with pytest.raises(DeserializationError, match="body for Order") as caught:
        envelope.decode(Order)

    assert problem in str(caught.value)
    assert caught.value.reason == "deserialization_error"


@MALFORMED
def test_malformed_structured_document_fails_to_decode(body: bytes, problem: str) -> None:
    """A malformed structured document raises DeserializationError saying what is wrong."""
    message = WireMessage(headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=body)

    with pytest.raises(DeserializationError, match="structured CloudEvent") as caught:
        decode_wire(message)

    assert problem in str(caught.value)


@MALFORMED
def test_malformed_bytes_without_headers_are_not_read_as_an_event(
    body: bytes, problem: str
) -> None:
    """Raw malformed bytes with no headers raise DeserializationError, never anything else."""
    with pytest.raises(DeserializationError, match="CloudEvent"):
        decode_wire(WireMessage(body=body))


@pytest.mark.parametrize(
    "message",
    [
        WireMessage(body=b"hello, world"),
        WireMessage(headers={"content-type": "text/plain"}, body=b"hello"),
        WireMessage(headers={"content-type": JSON_CONTENT_TYPE}, body=b"[1]"),
    ],
    ids=["text", "text-with-type", "json-array"],
)
def test_no_cloudevent_at_all(message: WireMessage) -> None:
    """A message with neither ce-* headers nor a structured document is refused."""
    with pytest.raises(DeserializationError, match="not a CloudEvent") as caught:
        decode_wire(message)

    assert f"{len(message.body)} bytes" in str(caught.value)


def test_plain_json_object_is_not_taken_for_an_event() -> None:
    """A bare JSON body without CloudEvents attributes fails on the first missing one."""
    with pytest.raises(DeserializationError, match="no 'id' attribute") as caught:
        decode_wire(WireMessage(body=orjson.dumps(ORDER_JSON)))

    assert caught.value.field == "/id"


@pytest.mark.parametrize(
    "message",
    [
        WireMessage(headers={k: v for k, v in MINIMAL_HEADERS.items() if k != "ce-id"}),
        structured({k: v for k, v in MINIMAL.items() if k != "id"}),
    ],
    ids=["binary", "structured"],
)
def test_missing_id_is_refused(message: WireMessage) -> None:
    """An event without an id is refused, naming the attribute."""
    with pytest.raises(DeserializationError, match="'id'") as caught:
        decode_wire(message)

    assert caught.value.field == "/id"


@pytest.mark.parametrize(
    "message",
    [
        WireMessage(headers={**MINIMAL_HEADERS, "ce-id": ""}),
        structured({**MINIMAL, "id": ""}),
        structured({**MINIMAL, "id": 7}),
    ],
    ids=["binary-empty", "structured-empty", "structured-number"],
)
def test_empty_or_non_string_id_is_refused(message: WireMessage) -> None:
    """An id must be a non-empty string."""
    with pytest.raises(DeserializationError, match="'id'"):
        decode_wire(message)


@pytest.mark.parametrize(
    "message",
    [
        WireMessage(headers={**MINIMAL_HEADERS, "ce-specversion": "0.3"}),
        structured({**MINIMAL, "specversion": "0.3"}),
        structured({**MINIMAL, "specversion": 1.0}),
    ],
    ids=["binary", "structured", "structured-number"],
)
def test_wrong_specversion_is_refused(message: WireMessage) -> None:
    """Only CloudEvents 1.0 is read; the message names the attribute and the version."""
    with pytest.raises(DeserializationError, match=r"'specversion'.*'1\.0'") as caught:
        decode_wire(message)

    assert caught.value.field == "/specversion"


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({**MINIMAL, "datacontenttype": 5, "data": "x"}, "/datacontenttype"),
        ({**MINIMAL, "source": ["a"]}, "/source"),
        ({**MINIMAL, "time": "yesterday"}, "/time"),
        ({**MINIMAL, "data_base64": "not base64!"}, "/data_base64"),
        ({**MINIMAL, "data_base64": 12}, "/data_base64"),
    ],
    ids=["content-type-number", "source-array", "bad-time", "bad-base64", "base64-number"],
)
def test_bad_attribute_values_raise_deserialization_error(
    document: dict[str, Any], field: str
) -> None:
    """A wrongly typed or unparsable attribute is a DeserializationError pointing at it."""
    with pytest.raises(DeserializationError) as caught:
        decode_wire(structured(document))

    assert caught.value.field == field


# --- schema violations (DEV-09) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (Order, {"order_id": "o-1"}, "/total_cents"),
        (Order, {"order_id": "o-1", "total_cents": "lots"}, "/total_cents"),
        (Order, {"order_id": 42, "total_cents": 1}, "/order_id"),
        (
            Order,
            {"order_id": "o-1", "total_cents": 1, "lines": [{"sku": "A", "qty": 1}, {"sku": "B"}]},
            "/lines/1/qty",
        ),
        (
            Order,
            {
                "order_id": "o-1",
                "total_cents": 1,
                "lines": [{"sku": "A", "qty": 1}, {"sku": 3, "qty": 1}],
            },
            "/lines/1/sku",
        ),
        (Order, {"order_id": "o-1", "total_cents": 1, "lines": {"sku": "A"}}, "/lines"),
        (StrictOrder, {"order_id": "o-1", "total_cents": 1, "coupon": "X"}, "/coupon"),
        (Tagged, {"code": "x"}, "/code"),
        (Odd, {"a/b~c": "x"}, "/a~1b~0c"),
    ],
    ids=[
        "missing",
        "wrong-type",
        "number-for-string",
        "nested-missing",
        "nested-wrong-type",
        "object-for-list",
        "unknown-field-strict",
        "union",
        "pointer-escaping",
    ],
)
def test_schema_violation_points_at_the_field(
    model: type[BaseModel], body: dict[str, Any], field: str
) -> None:
    """Valid JSON that breaks the model raises SchemaValidationError with a JSON pointer."""
    with pytest.raises(SchemaValidationError) as caught:
        decode_body(orjson.dumps(body), model)

    assert caught.value.field == field
    assert field in str(caught.value)
    assert model.__name__ in str(caught.value)
    assert caught.value.reason == "schema_validation"
    assert isinstance(caught.value, DecodeError)


def test_envelope_decode_raises_the_same_schema_error() -> None:
    """Envelope.decode sorts failures exactly as decode_body does."""
    envelope = Envelope.new("t", Line(sku="A", qty=1), source="/test")

    with pytest.raises(SchemaValidationError) as caught:
        envelope.decode(Order)

    assert caught.value.field == "/order_id"


# --- WireMessage ----------------------------------------------------------------------------


def test_size_counts_body_and_header_bytes() -> None:
    """size is the body plus every header name and value, in UTF-8 bytes."""
    message = WireMessage(headers={"ce-id": "1", "x-note": "é"}, body=b"12345")

    assert message.size == 5 + len("ce-id1") + len("x-note") + len("é".encode())
    assert message.size == 19


@ENCODERS
def test_size_of_encoded_messages(encode: Encoder) -> None:
    """The size of an encoded event is exactly what it occupies on the wire."""
    message = encode(full_envelope())

    expected = len(message.body) + sum(
        len(k.encode()) + len(v.encode()) for k, v in message.headers.items()
    )
    assert message.size == expected
    assert WireMessage().size == 0


@ENCODERS
def test_message_id_is_read_without_decoding(encode: Encoder) -> None:
    """message_id finds the id in either mode, percent-decoded in headers."""
    message = encode(full_envelope(id="order 42/1"))

    assert message.message_id == "order 42/1"


@pytest.mark.parametrize(
    "message",
    [
        WireMessage(body=b"not json"),
        WireMessage(body=b"{truncated"),
        WireMessage(headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=b'{"id": 5}'),
        WireMessage(headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=b"[]"),
        WireMessage(headers={"ce-source": "/test"}, body=b'{"id": "the body is data"}'),
    ],
    ids=["text", "broken-json", "number-id", "array", "binary-without-id"],
)
def test_message_id_is_none_when_there_is_none(message: WireMessage) -> None:
    """message_id is None, not an exception, when no string id can be found."""
    assert message.message_id is None


def test_structured_content_type_wins_over_stray_ce_headers() -> None:
    """A structured document is read from the body even if ce-* headers came along."""
    message = WireMessage(
        headers={"content-type": f"{STRUCTURED_CONTENT_TYPE}; charset=utf-8", "ce-id": "stale"},
        body=orjson.dumps(MINIMAL),
    )

    assert decode_wire(message).id == "evt-1"
    assert message.message_id == "evt-1"


# --- time -------------------------------------------------------------------------------------


@ENCODERS
def test_naive_time_is_taken_as_utc(encode: Encoder) -> None:
    """A naive time is UTC: written with Z, and equal after a round trip."""
    envelope = full_envelope(time=datetime(2026, 1, 2, 3, 4, 5))

    assert envelope.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert decode_wire(encode(envelope)) == envelope


@ENCODERS
def test_time_offset_and_microseconds_survive(encode: Encoder) -> None:
    """A non-UTC offset is written as such and comes back as the same instant and offset."""
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30)))

    back = decode_wire(encode(full_envelope(time=moment)))

    assert back.time == moment
    assert back.time is not None
    assert back.time.utcoffset() == timedelta(hours=5, minutes=30)
    assert back.time.microsecond == 678901


def test_utc_time_is_written_with_z() -> None:
    """UTC times use the Z suffix, as RFC 3339 and the SDK do."""
    envelope = full_envelope(time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))

    assert encode_binary(envelope).headers["ce-time"] == "2026-01-02T03:04:05Z"
    assert orjson.loads(encode_structured(envelope).body)["time"] == "2026-01-02T03:04:05Z"


def test_time_without_offset_on_the_wire_is_read_as_utc() -> None:
    """A producer that omits the offset is read tolerantly, as UTC."""
    envelope = decode_wire(structured({**MINIMAL, "time": "2026-01-02T03:04:05"}))

    assert envelope.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_sdk_time_with_offset_is_read() -> None:
    """An SDK event stamped in another zone is read as the same instant."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-7)))

    for to_message in (ce_http.to_binary_event, ce_http.to_structured_event):
        assert decode_wire(to_wire(to_message(sdk_event(None, time=moment)))).time == moment


# --- Envelope.new -------------------------------------------------------------------------------


def test_new_starts_its_own_correlation_with_a_fresh_id() -> None:
    """new() gives a fresh id, correlates the event to itself and stamps an aware time."""
    first = Envelope.new("com.example.order.placed", ORDER, source="/shop", key="c-7")
    second = Envelope.new("com.example.order.placed", ORDER, source="/shop")

    assert first.id != second.id
    assert first.correlationid == first.id
    assert first.time is not None
    assert first.time.tzinfo is not None
    assert first.datacontenttype == JSON_CONTENT_TYPE
    assert first.decode(Order) == ORDER


def test_new_keeps_a_given_correlation_and_causation() -> None:
    """A follow-up event carries the correlation and causation it is given."""
    envelope = Envelope.new(
        "t", source="/s", correlationid="corr-1", causationid="evt-0", id="evt-1", time=MOMENT
    )

    assert (envelope.id, envelope.correlationid, envelope.causationid) == (
        "evt-1",
        "corr-1",
        "evt-0",
    )
    assert envelope.time == MOMENT
    assert envelope.data == b""


#: What the HTTP binding leaves unescaped: printable ASCII but space, '"' and '%'.
HEADER_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in ' "%')


@given(st.text(max_size=40))
def test_header_values_are_percent_encoded_exactly_as_quote_does(subject: str) -> None:
    """The fast path (no escaping needed) and ``quote`` agree on every value."""
    envelope = Envelope(id="e-1", source="/s", type="t", subject=subject)
    header = encode_binary(envelope).headers["ce-subject"]
    assert header == quote(subject, safe=HEADER_SAFE)
    assert decode_wire(encode_binary(envelope)).subject == subject


class Deferred(BaseModel):
    """A model whose validator pydantic builds on first use."""

    model_config = ConfigDict(defer_build=True)
    n: int = Field(ge=0)


def test_decode_body_builds_a_deferred_model_and_runs_its_validators() -> None:
    """decode_body calls the model's validator itself: a deferred one is built first."""
    assert decode_body(b'{"n": 3}', Deferred) == Deferred(n=3)
    with pytest.raises(SchemaValidationError) as raised:
        decode_body(b'{"n": -1}', Deferred)
    assert raised.value.field == "/n"
