"""The error hierarchy: the drawing in errors.py is the truth, and names follow the rules."""

from __future__ import annotations

import inspect
import re

import pytest

import wirework
from wirework import errors
from wirework.errors import (
    BrokerBusyError,
    BrokerError,
    BrokerUnavailableError,
    DecodeError,
    DeserializationError,
    HandlerSignal,
    MessageTooLargeError,
    QueueFullError,
    Reject,
    Retry,
    SchemaValidationError,
    UnknownMessageTypeError,
    WireworkError,
)

_TREE_LINE = re.compile(r"^(?P<prefix>[ │├└─]*)(?P<name>[A-Z]\w*)")


def drawn_parents() -> dict[str, str | None]:
    """Each class named in the docstring drawing, mapped to its drawn parent (None: a root)."""
    doc = errors.__doc__
    assert doc is not None
    lines = doc.splitlines()
    start = next(index for index, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    indent: int | None = None
    for line in lines[start:]:
        if not line.strip():
            continue
        if not line.startswith(" "):
            break  # the drawing is the indented block after "::"
        match = _TREE_LINE.match(line)
        assert match is not None, f"unreadable line in the drawing: {line!r}"
        prefix = match["prefix"]
        if indent is None:
            indent = len(prefix)
        depth, misaligned = divmod(len(prefix) - indent, 4)
        assert not misaligned, f"misaligned line in the drawing: {line!r}"
        del stack[depth:]
        parents[match["name"]] = stack[-1] if stack else None
        stack.append(match["name"])
    return parents


def real_parents() -> dict[str, str | None]:
    """Each exception class defined in errors.py, mapped to its base there (None: a root)."""
    found: dict[str, str | None] = {}
    for name, cls in vars(errors).items():
        if not (
            inspect.isclass(cls)
            and issubclass(cls, BaseException)
            and cls.__module__ == errors.__name__
        ):
            continue
        # Only bases from errors.py are drawn; a stdlib mixin (TimeoutError) is not.
        ours = [base for base in cls.__bases__ if base.__module__ == errors.__name__]
        assert len(ours) <= 1, f"{name} has more than one wirework base"
        found[name] = ours[0].__name__ if ours else None
    return found


def all_subclasses(root: type[BaseException]) -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    pending = [root]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    return found


def test_drawing_is_read() -> None:
    """The drawing parser sees both roots and a nested leaf, so the comparison means something."""
    parents = drawn_parents()

    assert parents["WireworkError"] is None
    assert parents["HandlerSignal"] is None
    assert parents["BrokerBusyError"] == "BrokerError"
    assert parents["SchemaValidationError"] == "DecodeError"
    assert parents["Reject"] == "HandlerSignal"


def test_drawing_matches_the_class_hierarchy() -> None:
    """Every class in errors.py is drawn under its real base, and nothing else is drawn."""
    assert drawn_parents() == real_parents()


def test_wirework_errors_are_named_error() -> None:
    """Every WireworkError subclass, wherever defined, has a name ending in Error."""
    loaded = all_subclasses(WireworkError)

    assert loaded  # the walk found the tree
    assert sorted(cls.__name__ for cls in loaded if not cls.__name__.endswith("Error")) == []


def test_handler_signals_are_not_errors() -> None:
    """Retry and Reject steer a message on purpose: no WireworkError, no Error suffix."""
    signals = all_subclasses(HandlerSignal)

    assert {Retry, Reject} <= signals
    for signal in signals | {HandlerSignal}:
        assert not issubclass(signal, WireworkError), signal
        assert not signal.__name__.endswith("Error"), signal


def test_everything_exported_from_errors_is_in_the_tree() -> None:
    """The package exports no exception class that escapes the drawing."""
    exported = {
        name
        for name in dir(wirework)
        if inspect.isclass(getattr(wirework, name))
        and issubclass(getattr(wirework, name), BaseException)
    }

    assert exported <= set(drawn_parents())


WIREWORK_ERRORS: list[type[WireworkError]] = sorted(
    (c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, WireworkError)),
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", WIREWORK_ERRORS, ids=[c.__name__ for c in WIREWORK_ERRORS])
def test_retriable_flag(cls: type[WireworkError]) -> None:
    """Only the errors where repeating the same call may succeed are retriable."""
    retriable = {
        BrokerUnavailableError,
        BrokerBusyError,
        QueueFullError,
        errors.RequestTimeoutError,
        errors.TooManyPendingRequestsError,
        errors.PublishOutcomeUnknownError,  # retrying may store a second copy: dedupe downstream
        errors.TooManyRequestsError,
        errors.ServiceUnavailableError,
        errors.StoreUnavailableError,
        errors.StoreBusyError,
        errors.StoreConflictError,
        errors.ReplyLostError,  # the request may have been handled: retry what is safe to repeat
        errors.SagaLeaseLostError,
    }

    assert cls.retriable is (cls in retriable)


def test_decode_errors_are_never_retriable_and_carry_their_reason() -> None:
    """Decode errors dead-letter at once, with the reason RELIABILITY.md names."""
    reasons = {
        DeserializationError: "deserialization_error",
        SchemaValidationError: "schema_validation",
        UnknownMessageTypeError: "unknown_message_type",
    }

    for cls, reason in reasons.items():
        error = cls("bad", field="/qty")
        assert (error.reason, error.field, error.retriable) == (reason, "/qty", False)
        assert isinstance(error, DecodeError)
    assert DeserializationError("bad").field is None


def test_message_too_large_names_size_limit_and_topic() -> None:
    """MessageTooLargeError says how big the message was, the limit, and the topic."""
    error = MessageTooLargeError(1_048_577, 1_048_576, topic="orders")

    assert "1048577 bytes" in str(error)
    assert "limit of 1048576 bytes" in str(error)
    assert "'orders'" in str(error)
    assert (error.size, error.limit, error.topic) == (1_048_577, 1_048_576, "orders")
    assert isinstance(error, BrokerError)
    assert not error.retriable


def test_retry_and_reject_carry_their_arguments() -> None:
    """Retry keeps its delay and a default message; Reject keeps its reason."""
    assert Retry(delay=2.5).delay == 2.5
    assert str(Retry()) == "retry requested by handler"
    assert Retry().delay is None
    assert str(Retry(reason="stock not yet synced")) == "stock not yet synced"
    assert Reject("invalid order").reason == "invalid order"


@pytest.mark.parametrize("cls", WIREWORK_ERRORS, ids=[c.__name__ for c in WIREWORK_ERRORS])
def test_every_error_maps_to_an_http_status_and_a_grpc_code(cls: type[WireworkError]) -> None:
    """Errors map once: each class has a 4xx/5xx status and a real gRPC status code name."""
    import grpc  # type: ignore[import-untyped]

    assert 400 <= cls.http_status <= 599
    assert cls.grpc_code in grpc.StatusCode.__members__
    assert cls.grpc_code != "OK"


def test_a_registered_error_is_rebuilt_as_itself_and_others_become_remote_errors() -> None:
    """The caller gets back the class the handler raised when it knows it, whatever its init."""

    class OutOfStockError(errors.ConflictError):
        pass

    rebuilt = errors.rebuild_error(errors.error_name(OutOfStockError), "sku-1 has 0 left")
    assert type(rebuilt) is OutOfStockError
    assert str(rebuilt) == "sku-1 has 0 left"
    timeout = errors.rebuild_error(errors.error_name(errors.RequestTimeoutError), "late")
    assert type(timeout) is errors.RequestTimeoutError
    assert str(timeout) == "late"

    unknown = errors.rebuild_error("elsewhere.KeyError", "'sku'")
    assert isinstance(unknown, errors.RemoteError)
    assert (unknown.remote_type, unknown.remote_message) == ("elsewhere.KeyError", "'sku'")
