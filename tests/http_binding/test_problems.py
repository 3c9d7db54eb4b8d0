"""How each kind of error becomes problem details: status, type, detail, and what never leaks."""

from __future__ import annotations

import logging

import pytest

from wirework.errors import (
    BrokerUnavailableError,
    CircuitOpenError,
    ServiceUnavailableError,
    rebuild_error,
)
from wirework.http import InvalidInputError, Problem
from wirework.http.problems import problem_for


def test_a_call_error_keeps_its_message_status_and_retriability() -> None:
    problem = problem_for(ServiceUnavailableError("the ledger is down"), "/v1/pay")
    assert problem == {
        "type": "urn:wirework:error:wirework.errors.ServiceUnavailableError",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "the ledger is down",
        "instance": "/v1/pay",
        "error_type": "wirework.errors.ServiceUnavailableError",
        "retriable": True,
    }
    Problem.model_validate(problem)
    rebuilt = rebuild_error(problem["error_type"], problem["detail"])
    assert type(rebuilt) is ServiceUnavailableError


def test_other_wirework_errors_keep_their_class_but_not_their_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = BrokerUnavailableError("cannot reach redis://cache.internal.example:6379")
    with caplog.at_level(logging.WARNING, logger="wirework.http"):
        problem = problem_for(error, "/v1/orders")
    assert (problem["status"], problem["retriable"]) == (503, True)
    assert problem["error_type"] == "wirework.errors.BrokerUnavailableError"
    assert "internal.example" not in problem["detail"]
    assert "internal.example" in caplog.text
    circuit = problem_for(CircuitOpenError("payments is open", retry_after=3.0), "/v1/pay")
    assert circuit["status"] == 503


def test_an_unexpected_exception_is_500_with_nothing_of_it_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError("password=hunter2")
    except KeyError as error:
        with caplog.at_level(logging.ERROR, logger="wirework.http"):
            problem = problem_for(error, "/v1/login")
    assert (problem["status"], problem["error_type"], problem["retriable"]) == (
        500,
        "internal",
        False,
    )
    assert "hunter2" not in str(problem)
    assert "Traceback" in caplog.text
    assert "hunter2" in caplog.text


def test_invalid_input_lists_every_value() -> None:
    items = [{"loc": ["query", f"p{n}"], "msg": "bad", "type": "int_parsing"} for n in range(7)]
    problem = problem_for(InvalidInputError(items), "/v1/x")
    assert problem["status"] == 422
    assert problem["errors"] == items
    assert "and 2 more" in problem["detail"]
    Problem.model_validate(problem)
