"""The typed client on a real uvicorn server: results, errors, deadlines, streams, balancing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import assert_type

import pytest
from starlette.types import Receive, Scope, Send

from tests.http_binding.catalog import (
    Attempts,
    Colour,
    Item,
    NewItem,
    Note,
    Tally,
    Ticker,
    add_item,
    add_up,
    broken,
    catalog,
    count,
    faulty,
    flaky_get,
    flaky_post,
    forever,
    get_item,
    list_items,
    remove_item,
    seen,
    slow,
    wrong_type,
)
from wirework.errors import (
    ConfigurationError,
    ConflictError,
    DeadlineExceededError,
    NotFoundError,
    RemoteError,
    ServiceUnavailableError,
)
from wirework.http import InvalidInputError, http_app
from wirework.http.client import HttpClient
from wirework.http.errors import ServiceUnreachableError, UnexpectedResponseError
from wirework.http.server import HttpServer
from wirework.registry import Registry
from wirework.resilience import Pipeline, Retry, RetrySettings, Timeout
from wirework.resilience.deadline import Deadline, deadline_scope
from wirework.testing.conformance import wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def drain(stream: AsyncIterator[Tally], into: list[Tally]) -> None:
    async for tally in stream:
        into.append(tally)


async def test_a_call_returns_the_handlers_model(client: HttpClient) -> None:
    item = await client.call(get_item, item_id=2)
    assert_type(item, Item)  # mypy checks the client's typing here
    assert isinstance(item, Item)
    assert item == Item(id=2, name="desk", price=200, colour=Colour.BLUE, tags=["wood"])
    by_name = await client.call("GetItem", item_id=1)
    assert by_name.name == "lamp"


async def test_query_body_and_no_content_endpoints(client: HttpClient) -> None:
    listed = await client.call(list_items, colour=Colour.BLUE, limit=5)
    assert [i.id for i in listed.items] == [2]
    created = await client.call(add_item, item=NewItem(name="chair", price=45, tags=["oak"]))
    assert (created.id, created.name, created.tags) == (3, "chair", ["oak"])
    from_dict = await client.call(add_item, item={"name": "rug", "price": 10})
    assert from_dict.id == 4
    await client.call(remove_item, item_id=3)
    with pytest.raises(NotFoundError):
        await client.call(get_item, item_id=3)


async def test_a_handlers_call_error_comes_back_as_its_class(client: HttpClient) -> None:
    with pytest.raises(NotFoundError, match="no item 99"):
        await client.call(get_item, item_id=99)
    with pytest.raises(ConflictError, match="'lamp' exists"):
        await client.call(add_item, item=NewItem(name="lamp", price=1))


async def test_an_unexpected_exception_is_a_remote_error_without_its_details(
    server: HttpServer,
) -> None:
    registry = Registry({"faulty": [server.url]})
    async with HttpClient("faulty", faulty, registry=registry) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call(broken)
        assert type(caught.value) is RemoteError
        assert caught.value.remote_type == "internal"
        assert "secret" not in str(caught.value)
        assert "/etc/passwd" not in str(caught.value)
        with pytest.raises(RemoteError):
            await client.call(wrong_type)


async def test_arguments_are_validated_before_anything_is_sent() -> None:
    """The registry points at a closed port: anything sent would be ServiceUnreachableError."""
    registry = Registry({"catalog": [f"http://127.0.0.1:{free_port()}"]})
    async with HttpClient("catalog", catalog, registry=registry) as client:
        with pytest.raises(InvalidInputError) as caught:
            await client.call(add_item, item={"name": "", "price": -1})
        assert [item["loc"] for item in caught.value.items] == [["body", "name"], ["body", "price"]]
        with pytest.raises(InvalidInputError) as bad_path:
            await client.call(get_item, item_id="seven")
        assert bad_path.value.items[0]["loc"] == ["path", "item_id"]
        with pytest.raises(ServiceUnreachableError):
            await client.call(get_item, item_id=7)


async def test_the_deadline_and_idempotency_key_reach_the_handler(client: HttpClient) -> None:
    plain = await client.call(seen, idempotency_key="order-42")
    assert plain.idempotency_key == "order-42"
    assert plain.user_agent is not None
    assert plain.user_agent.startswith("Python/")  # aiohttp's, read from the lower-cased headers
    assert plain.deadline_ms is not None
    assert 0 < plain.deadline_ms <= 5000
    with deadline_scope(Deadline.after(0.8)):
        inherited = await client.call(seen)
    assert inherited.deadline_ms is not None
    assert 0 < inherited.deadline_ms <= 800
    assert inherited.idempotency_key is None


async def test_a_passed_deadline_cuts_the_call(server: HttpServer) -> None:
    registry = Registry({"faulty": [server.url]})
    async with HttpClient("faulty", faulty, registry=registry) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceededError):
            await client.call(slow, seconds=3.0, timeout=0.2)
        assert loop.time() - started < 2.0
        with deadline_scope(Deadline.after(-1)), pytest.raises(DeadlineExceededError):
            await client.call(slow)


async def test_server_streams_arrive_item_by_item_and_errors_after_them(
    client: HttpClient,
) -> None:
    tallies = [t async for t in client.stream(count, upto=4)]
    assert_type(tallies, list[Tally])
    assert tallies == [
        Tally(count=1, total=0),
        Tally(count=2, total=1),
        Tally(count=3, total=3),
        Tally(count=4, total=6),
    ]
    received: list[Tally] = []
    with pytest.raises(NotFoundError, match="gone after 2"):
        await drain(client.stream(count, upto=5, fail_at=2), received)
    assert len(received) == 2
    with pytest.raises(NotFoundError, match="gone after 0"):
        await drain(client.stream(count, upto=5, fail_at=0), received)
    assert len(received) == 2
    assert [t async for t in client.stream(count, upto=0)] == []


async def test_client_streams_send_ndjson(client: HttpClient) -> None:
    listed = [Tally(count=1, total=n) for n in range(50)]
    assert await client.call(add_up, notes=listed) == Tally(count=50, total=sum(range(50)))

    async def produce() -> AsyncIterator[Tally]:
        for n in range(3):
            await asyncio.sleep(0)
            yield Tally(count=1, total=n)

    assert await client.call(add_up, notes=produce()) == Tally(count=3, total=3)


async def test_calls_turn_round_robin_across_instances(server: HttpServer) -> None:
    async with HttpServer(http_app(catalog), "127.0.0.1", 0) as second:
        registry = Registry({"catalog": [server.url, second.url]})
        async with HttpClient("catalog", catalog, registry=registry) as client:
            hosts = [(await client.call(seen)).host for _ in range(4)]
    first_host, second_host = server.url[len("http://") :], second.url[len("http://") :]
    assert hosts == [first_host, second_host, first_host, second_host]


async def test_an_answer_that_is_not_problem_json_is_an_unexpected_response() -> None:
    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        page = b"<html><body>502 Bad Gateway</body></html>"
        await send(
            {
                "type": "http.response.start",
                "status": 502,
                "headers": [
                    (b"content-type", b"text/html"),
                    (b"content-length", b"%d" % len(page)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": page})

    async with HttpServer(proxy, "127.0.0.1", 0) as gateway:
        registry = Registry({"catalog": [gateway.url]})
        async with HttpClient("catalog", catalog, registry=registry) as client:
            with pytest.raises(UnexpectedResponseError) as caught:
                await client.call(get_item, item_id=1)
    assert isinstance(caught.value, RemoteError)
    assert caught.value.status == 502
    assert "text/html" in str(caught.value)


async def test_with_a_retry_policy_a_post_without_idempotency_key_is_never_retried(
    server: HttpServer,
) -> None:
    attempts = Attempts()
    saved = faulty.overrides()
    faulty.override(Attempts, attempts)
    policy = Pipeline(
        Timeout(5), Retry(RetrySettings(max_attempts=3, base_delay=0.01), name="faulty")
    )
    try:
        async with HttpClient(faulty, address=server.url, policy=policy) as client:
            with pytest.raises(ServiceUnavailableError):
                await client.call(flaky_post)
            assert attempts.count == 1
            with pytest.raises(ServiceUnavailableError):
                await client.call(flaky_post, idempotency_key="charge-7")
            assert attempts.count == 1 + 3
            with pytest.raises(ServiceUnavailableError):
                await client.call(flaky_get)
            assert attempts.count == 1 + 3 + 3
    finally:
        faulty.reset_overrides(saved)


async def test_a_client_needs_endpoints_and_one_source_of_addresses() -> None:
    with pytest.raises(ConfigurationError, match="needs the service's endpoints"):
        HttpClient("catalog")
    with pytest.raises(ConfigurationError, match="not both"):
        HttpClient(catalog, address="http://127.0.0.1:1", registry=Registry({}))
    client = HttpClient(catalog, address="http://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="not an HTTP endpoint"):
        await client.call("Nothing")
    with pytest.raises(ConfigurationError, match="server stream"):
        await client.call("count", upto=1)  # by name: mypy rejects a stream here
    await client.aclose()


async def test_a_server_stream_stops_when_the_client_leaves_or_the_deadline_passes(
    server: HttpServer,
) -> None:
    saved = faulty.overrides()
    left, timed = Ticker(), Ticker()
    try:
        async with HttpClient(faulty, address=server.url) as client:
            faulty.override(Ticker, left)
            async for note in client.stream(forever):
                if note.text == "tick 3":
                    break
            await wait_until(lambda: left.closed, timeout=5.0, what="the generator to be closed")
            assert left.sent < 1000  # closed promptly, not after running on

            faulty.override(Ticker, timed)
            with pytest.raises(DeadlineExceededError):
                await drain_notes(client.stream(forever, timeout=0.3))
            await wait_until(lambda: timed.closed, timeout=5.0, what="the generator to be closed")
    finally:
        faulty.reset_overrides(saved)


async def drain_notes(stream: AsyncIterator[Note]) -> None:
    async for _ in stream:
        pass
