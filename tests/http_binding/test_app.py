"""The REST app on the wire: statuses, media types and problem+json, seen by a plain client."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from wirework.http.server import HttpServer

PROBLEM = "application/problem+json"


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, str, bytes, Any]:
    async with session.request(method, url, **options) as response:
        body = await response.read()
        return response.status, response.content_type, body, response.headers


def problem_of(body: bytes) -> dict[str, Any]:
    problem: dict[str, Any] = orjson.loads(body)
    assert set(problem) >= {
        "type",
        "title",
        "status",
        "detail",
        "instance",
        "error_type",
        "retriable",
    }
    assert problem["type"] == f"urn:wirework:error:{problem['error_type']}"
    return problem


async def test_health_and_the_openapi_document(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(session, "GET", f"{server.url}/healthz")
    assert (status, media, orjson.loads(body)) == (200, "application/json", {"status": "ok"})
    status, media, body, _ = await fetch(session, "GET", f"{server.url}/openapi.json")
    assert (status, media) == (200, "application/json")
    assert orjson.loads(body)["openapi"] == "3.1.0"


async def test_a_handlers_error_is_problem_json_with_its_class(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(session, "GET", f"{server.url}/v1/items/99")
    assert (status, media) == (404, PROBLEM)
    problem = problem_of(body)
    assert problem["error_type"] == "wirework.errors.NotFoundError"
    assert problem["title"] == "Not Found"
    assert problem["detail"] == "no item 99; GET /v1/items lists them"
    assert problem["instance"] == "/v1/items/99"
    assert problem["retriable"] is False


async def test_unknown_routes_and_wrong_methods_are_problem_json(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(session, "GET", f"{server.url}/v2/nothing")
    assert (status, media, problem_of(body)["status"]) == (404, PROBLEM, 404)
    status, media, body, headers = await fetch(session, "PATCH", f"{server.url}/v1/items/1")
    assert (status, media) == (405, PROBLEM)
    assert problem_of(body)["error_type"] == "wirework.http.errors.MethodNotAllowedError"
    assert set(headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}


async def test_invalid_input_is_one_422_naming_every_value_without_echoing_it(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    secret = "tok_live_sk_0123456789"
    status, media, body, _ = await fetch(
        session, "GET", f"{server.url}/v1/items", params={"colour": secret, "limit": secret}
    )
    assert (status, media) == (422, PROBLEM)
    problem = problem_of(body)
    assert sorted(e["loc"] for e in problem["errors"]) == [["query", "colour"], ["query", "limit"]]
    assert all(set(e) == {"loc", "msg", "type"} for e in problem["errors"])
    assert secret not in body.decode()

    status, _, body, _ = await fetch(
        session, "PUT", f"{server.url}/v1/items/one", json={"name": secret * 10, "price": "x"}
    )
    assert status == 422
    assert sorted(e["loc"] for e in problem_of(body)["errors"]) == [
        ["body", "name"],
        ["body", "price"],
        ["path", "item_id"],
    ]
    assert secret not in body.decode()


async def test_a_body_that_is_not_json_is_400(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(
        session,
        "POST",
        f"{server.url}/v1/items",
        data=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert (status, media) == (400, PROBLEM)
    assert "not valid JSON" in problem_of(body)["detail"]


async def test_success_statuses_and_media_types(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(
        session, "POST", f"{server.url}/v1/items", json={"name": "stool", "price": 12}
    )
    assert (status, media, orjson.loads(body)["id"]) == (201, "application/json", 3)
    status, _, body, _ = await fetch(session, "DELETE", f"{server.url}/v1/items/3")
    assert (status, body) == (204, b"")
    status, media, body, _ = await fetch(session, "GET", f"{server.url}/v1/count/2")
    assert (status, media) == (200, "application/x-ndjson")
    assert body == b'{"count":1,"total":0}\n{"count":2,"total":1}\n'


async def test_the_deadline_header_cuts_the_handler_on_the_server(
    server: HttpServer, session: aiohttp.ClientSession
) -> None:
    status, media, body, _ = await fetch(
        session,
        "GET",
        f"{server.url}/v1/slow",
        params={"seconds": "3"},
        headers={"x-wirework-deadline": "100"},
        timeout=aiohttp.ClientTimeout(total=2),
    )
    assert (status, media) == (504, PROBLEM)
    assert problem_of(body)["error_type"] == "wirework.errors.DeadlineExceededError"
