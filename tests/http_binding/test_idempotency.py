"""``Idempotency-Key`` on the wire (RELIABILITY.md DEV-23, P10): a real server, real requests,
the key records in a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import BaseModel, Field

from tests.helpers.stores import BACKENDS, empty_store_url, opened_store
from wirework.errors import ConfigurationError, ConflictError
from wirework.http import HttpClient, http_app
from wirework.http.idempotency import TABLE, IdempotencyKeyInUseError, IdempotencySettings
from wirework.http.server import HttpServer
from wirework.service import CallContext, Service
from wirework.store import Store
from wirework.testing.conformance import wait_until

PROBLEM = "application/problem+json"
ORDERS = "/v1/orders"
PAYMENTS = "/v1/payments"


class NewOrder(BaseModel):
    sku: str = Field(min_length=1)
    qty: int = Field(ge=1)


class Order(BaseModel):
    id: int
    sku: str
    qty: int
    key: str | None


class Shop:
    """A service whose handlers count their runs, and can be held on an event."""

    def __init__(self, store: Store) -> None:
        self.runs = 0
        self.gate: asyncio.Event | None = None
        self.service = Service("shop", store=store)
        svc = self.service

        @svc.post(ORDERS, status_code=201)
        async def place_order(order: NewOrder, ctx: CallContext) -> Order:
            """Optional key (the POST default)."""
            return await self.run(order, ctx)

        @svc.post(PAYMENTS, idempotency="required")
        async def pay(order: NewOrder, ctx: CallContext) -> Order:
            """A key is required."""
            return await self.run(order, ctx)

        self.place_order = place_order

    async def run(self, order: NewOrder, ctx: CallContext) -> Order:
        self.runs += 1
        number = self.runs
        if self.gate is not None:
            await self.gate.wait()
        if order.sku == "boom":
            raise RuntimeError("a bug, after the handler began")
        if order.sku == "taken":
            raise ConflictError(f"sku taken (run {number})")
        return Order(id=number, sku=order.sku, qty=order.qty, key=ctx.idempotency_key)


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty store of one backend: a fresh SQLite file, or a PostgreSQL schema dropped after."""
    async with empty_store_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with opened_store(store_url) as opened:
        yield opened


@pytest.fixture
def shop(store: Store) -> Shop:
    return Shop(store)


@pytest.fixture
async def server(shop: Shop) -> AsyncIterator[HttpServer]:
    async with HttpServer(http_app(shop.service), "127.0.0.1", 0) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as plain:
        yield plain


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("Content-Type") == PROBLEM
        problem: dict[str, Any] = orjson.loads(self.body)
        return problem


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any] | bytes,
    key: str | None = None,
    *,
    who: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Answer:
    sent: list[tuple[str, str]] = [("Content-Type", "application/json")]
    if key is not None:
        sent.append(("Idempotency-Key", key))
    if who is not None:
        sent.append(("Authorization", f"Bearer {who}"))
    sent.extend(headers or [])
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(url, data=data, headers=sent) as response:
        return Answer(response.status, response.headers, await response.read())


LAMP = {"sku": "lamp", "qty": 1}


async def test_the_first_request_runs_and_a_retry_replays_it_with_the_marker(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """DEV-23 case 1: same key and body twice: identical status and bytes, a marker, one run."""
    key = str(uuid.uuid4())
    first = await post(session, server.url + ORDERS, LAMP, f'"{key}"')
    again = await post(session, server.url + ORDERS, LAMP, key)  # the bare form: the same key
    assert (first.status, first.replayed) == (201, False)
    assert (again.status, again.replayed, again.body) == (201, True, first.body)
    assert again.headers["Content-Type"] == "application/json"
    assert orjson.loads(first.body)["key"] == key  # the handler sees the key unquoted
    assert shop.runs == 1


async def test_errors_the_handler_raised_are_replayed_too(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """A 500 and a handler's own 409 are stored and replayed: the handler began, its outcome
    stands."""
    for sku, status in (("boom", 500), ("taken", 409)):
        body = {"sku": sku, "qty": 1}
        first = await post(session, server.url + ORDERS, body, f"k-{sku}")
        again = await post(session, server.url + ORDERS, body, f"k-{sku}")
        assert (first.status, first.replayed) == (status, False)
        assert (again.status, again.replayed, again.body) == (status, True, first.body)
        assert again.problem()["status"] == status
    assert shop.runs == 2


async def test_a_request_refused_before_the_handler_stores_nothing(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """Invalid input (422) is not stored: the corrected request with the same key runs."""
    refused = await post(session, server.url + ORDERS, {"sku": "lamp", "qty": 0}, "k-1")
    assert refused.status == 422
    assert refused.problem()["error_type"] == "wirework.http.errors.InvalidInputError"
    fixed = await post(session, server.url + ORDERS, LAMP, "k-1")
    assert (fixed.status, fixed.replayed, shop.runs) == (201, False, 1)


async def test_the_same_key_while_the_first_is_in_flight_is_409(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """A retry racing the first request gets 409 (retriable), then the stored answer."""
    shop.gate = asyncio.Event()
    first = asyncio.create_task(post(session, server.url + ORDERS, LAMP, "k-1"))
    await wait_until(lambda: shop.runs == 1, what="the first request to reach the handler")
    racing = await post(session, server.url + ORDERS, LAMP, "k-1")
    assert racing.status == 409
    problem = racing.problem()
    assert problem["error_type"] == "wirework.http.idempotency.IdempotencyKeyInUseError"
    assert problem["retriable"] is True
    shop.gate.set()
    answered = await first
    later = await post(session, server.url + ORDERS, LAMP, "k-1")
    assert (answered.status, later.status, later.replayed) == (201, 201, True)
    assert later.body == answered.body
    assert shop.runs == 1


async def test_the_same_key_with_a_different_request_is_422(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """DEV-23 case 2: 422, no new run, and the stored answer unchanged."""
    first = await post(session, server.url + ORDERS, LAMP, "k-1")
    other = await post(session, server.url + ORDERS, {"sku": "desk", "qty": 1}, "k-1")
    assert other.status == 422
    assert other.problem()["error_type"] == "wirework.http.idempotency.IdempotencyKeyReusedError"
    again = await post(session, server.url + ORDERS, LAMP, "k-1")
    assert (again.status, again.replayed, again.body) == (201, True, first.body)
    assert shop.runs == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "k" * 256)],
        [("Idempotency-Key", '"' + "k" * 256 + '"')],
        [("Idempotency-Key", '"unterminated')],
        [("Idempotency-Key", '"a";param=1')],
        [("Idempotency-Key", '"a", "b"')],
        [("Idempotency-Key", "has space")],
        [("Idempotency-Key", '""')],
        [("Idempotency-Key", "a"), ("Idempotency-Key", "a")],
    ],
    ids=["256-bare", "256-quoted", "unterminated", "parameters", "list", "space", "empty", "two"],
)
async def test_an_invalid_key_is_400_and_runs_nothing(
    server: HttpServer,
    shop: Shop,
    session: aiohttp.ClientSession,
    headers: list[tuple[str, str]],
) -> None:
    """DEV-23 case 4: a key over 255 characters, not an sf-string, or repeated: 400."""
    answer = await post(session, server.url + ORDERS, LAMP, headers=headers)
    assert answer.status == 400
    problem = answer.problem()
    assert problem["error_type"] == "wirework.http.idempotency.IdempotencyKeyError"
    assert "Idempotency-Key" in problem["detail"]
    assert shop.runs == 0


async def test_a_key_of_255_characters_is_accepted(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    answer = await post(session, server.url + ORDERS, LAMP, '"' + "k" * 255 + '"')
    assert (answer.status, shop.runs) == (201, 1)


async def test_a_required_key_missing_is_400_and_an_optional_one_is_not_needed(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """DEV-23 case 3: 400 where the endpoint requires a key; without one, nothing is stored."""
    missing = await post(session, server.url + PAYMENTS, LAMP)
    assert missing.status == 400
    assert "requires an Idempotency-Key" in missing.problem()["detail"]
    assert shop.runs == 0
    paid = await post(session, server.url + PAYMENTS, LAMP, "pay-1")
    assert (paid.status, shop.runs) == (200, 1)
    for _ in range(2):
        plain = await post(session, server.url + ORDERS, LAMP)
        assert (plain.status, plain.replayed) == (201, False)
    assert shop.runs == 3


async def test_keys_are_scoped_per_client(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """DEV-23 case 5: one key from two principals: two runs, and each gets its own answer."""
    alice = await post(session, server.url + ORDERS, LAMP, "k-1", who="alice")
    bob = await post(session, server.url + ORDERS, LAMP, "k-1", who="bob")
    assert (alice.status, bob.status, shop.runs) == (201, 201, 2)
    assert orjson.loads(alice.body)["id"] != orjson.loads(bob.body)["id"]
    alice_again = await post(session, server.url + ORDERS, LAMP, "k-1", who="alice")
    bob_again = await post(session, server.url + ORDERS, LAMP, "k-1", who="bob")
    assert (alice_again.body, bob_again.body) == (alice.body, bob.body)
    assert alice_again.replayed
    assert bob_again.replayed
    assert shop.runs == 2


async def test_an_expired_key_is_a_new_request_and_expired_records_are_pruned(
    shop: Shop, store: Store, session: aiohttp.ClientSession
) -> None:
    """After the TTL a key runs again; writing new records deletes expired ones."""
    settings = IdempotencySettings(ttl=0.5, in_flight_timeout=0.5)
    app = http_app(shop.service, idempotency=settings)
    assert "0.5 s" in str(app.state.openapi["paths"][ORDERS]["post"]["parameters"])
    async with HttpServer(app, "127.0.0.1", 0) as server:
        first = await post(session, server.url + ORDERS, LAMP, "old")
        assert (first.status, shop.runs) == (201, 1)

        async def ran_again() -> bool:
            answer = await post(session, server.url + ORDERS, LAMP, "old")
            return not answer.replayed

        await wait_until(ran_again, what="the key to expire")
        assert shop.runs == 2

        async def pruned() -> bool:
            await post(session, server.url + ORDERS, LAMP, str(uuid.uuid4()))
            async with store.transaction() as tx:
                stale = await tx.fetchval(
                    f"SELECT count(*) FROM {TABLE} WHERE expires_at <= $1", await store.now(tx)
                )
            return int(stale) == 0

        await wait_until(pruned, what="expired records to be deleted by new ones")


async def test_twenty_concurrent_retries_of_one_key_run_the_handler_once(
    server: HttpServer, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """Twenty requests with one key at once: one run; the rest 409 until it ends, then replays."""
    shop.gate = asyncio.Event()
    url = server.url + ORDERS
    tasks = [asyncio.create_task(post(session, url, LAMP, "k-20")) for _ in range(20)]
    await wait_until(lambda: sum(t.done() for t in tasks) == 19, what="19 requests refused")
    assert [t.result().status for t in tasks if t.done()] == [409] * 19
    shop.gate.set()
    answers = await asyncio.gather(*tasks)
    (winner,) = [a for a in answers if a.status == 201]
    retries = await asyncio.gather(*(post(session, url, LAMP, "k-20") for _ in range(20)))
    assert {(a.status, a.replayed, a.body) for a in retries} == {(201, True, winner.body)}
    assert shop.runs == 1


async def test_a_replayed_answer_reaches_the_typed_client_like_the_first(
    server: HttpServer, shop: Shop
) -> None:
    """``HttpClient``: the same model twice, and an in-flight 409 rebuilt as a retriable error."""
    async with HttpClient(shop.service, address=server.url, timeout=10.0) as client:
        order = NewOrder(sku="lamp", qty=2)
        first = await client.call(shop.place_order, order=order, idempotency_key="typed-1")
        again = await client.call(shop.place_order, order=order, idempotency_key="typed-1")
        assert again == first
        shop.gate = asyncio.Event()
        held = asyncio.create_task(
            client.call(shop.place_order, order=order, idempotency_key="typed-2")
        )
        await wait_until(lambda: shop.runs == 2, what="the held request to reach the handler")
        with pytest.raises(IdempotencyKeyInUseError) as caught:
            await client.call(shop.place_order, order=order, idempotency_key="typed-2")
        assert caught.value.retriable
        shop.gate.set()
        assert (await held).id == 2
    assert shop.runs == 2


async def test_a_required_key_without_a_store_is_refused_at_startup() -> None:
    lonely = Service("lonely")

    @lonely.post("/v1/pay", idempotency="required")
    async def pay(order: NewOrder) -> Order:
        return Order(id=1, sku=order.sku, qty=order.qty, key=None)

    with pytest.raises(ConfigurationError, match="has none: pass store="):
        http_app(lonely)


async def test_the_openapi_document_publishes_the_key_and_its_expiry(shop: Shop) -> None:
    """The draft's MUST: the expiry policy is published, on the header parameter."""
    operations = http_app(shop.service).state.openapi["paths"]
    (header,) = operations[ORDERS]["post"]["parameters"]
    assert (header["name"], header["in"], header["required"]) == (
        "Idempotency-Key",
        "header",
        False,
    )
    assert "24 h" in header["description"]
    assert "Idempotent-Replayed" in header["description"]
    assert operations[PAYMENTS]["post"]["parameters"][0]["required"] is True
    assert set(operations[ORDERS]["post"]["responses"]) >= {"400", "409", "422"}


def test_keys_are_optional_on_unary_post_and_patch_and_off_elsewhere() -> None:
    """The defaults, and a stream refusing key storage (its answer cannot be replayed whole)."""
    svc = Service("defaults")

    @svc.post("/v1/a")
    async def post_one(order: NewOrder) -> Order:
        raise NotImplementedError

    @svc.patch("/v1/a")
    async def patch_one(order: NewOrder) -> Order:
        raise NotImplementedError

    @svc.put("/v1/a")
    async def put_one(order: NewOrder) -> Order:
        raise NotImplementedError

    @svc.post("/v1/stream")
    async def stream_in(orders: AsyncIterator[NewOrder]) -> Order:
        raise NotImplementedError

    modes = {endpoint.method + endpoint.path: endpoint.idempotency for endpoint in svc.endpoints}
    assert modes == {
        "POST/v1/a": "optional",
        "PATCH/v1/a": "optional",
        "PUT/v1/a": "off",
        "POST/v1/stream": "off",
    }
    with pytest.raises(ConfigurationError, match="idempotency='off'"):

        @svc.post("/v1/stream2", idempotency="required")
        async def stream_keyed(orders: AsyncIterator[NewOrder]) -> Order:
            raise NotImplementedError


# -- a crashed first attempt ---------------------------------------------------------

_CRASHING_SERVER = """
import asyncio, sys
from pydantic import BaseModel
from wirework.http import http_app
from wirework.http.idempotency import IdempotencySettings
from wirework.http.server import HttpServer
from wirework.service import Service

class NewOrder(BaseModel):
    sku: str
    qty: int

class Order(BaseModel):
    id: int
    sku: str
    qty: int
    key: str | None

shop = Service("shop", store=sys.argv[1])

@shop.post("/v1/orders", status_code=201)
async def place_order(order: NewOrder) -> Order:
    print("ran", flush=True)
    await asyncio.Event().wait()  # held until the process is killed
    raise AssertionError("unreachable")

async def main() -> None:
    settings = IdempotencySettings(in_flight_timeout=float(sys.argv[2]))
    async with HttpServer(http_app(shop, idempotency=settings), "127.0.0.1", 0) as server:
        print(server.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def _line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(30):
        return (await process.stdout.readline()).decode().strip()


async def test_an_attempt_that_crashed_in_flight_is_taken_over_after_its_timeout(
    store: Store, store_url: str, shop: Shop, session: aiohttp.ClientSession
) -> None:
    """kill -9 mid-handler: the key answers 409 until the in-flight timeout, then runs again."""
    lease = 2.0
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_SERVER,
        store_url,
        str(lease),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = int(await _line(process))
        doomed = asyncio.create_task(
            post(session, f"http://127.0.0.1:{port}{ORDERS}", LAMP, "k-crash")
        )
        assert await _line(process) == "ran"
        process.kill()  # a real kill -9: the record stays in flight
        await process.wait()
        with contextlib.suppress(aiohttp.ClientError):
            await doomed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    async with store.transaction() as tx:
        row = await tx.fetchrow(f"SELECT state, lease_until FROM {TABLE}")
    assert row is not None
    assert row["state"] == "running"
    async with HttpServer(http_app(shop.service), "127.0.0.1", 0) as server:
        statuses: list[int] = []

        async def taken_over() -> bool:
            answer = await post(session, server.url + ORDERS, LAMP, "k-crash")
            statuses.append(answer.status)
            return answer.status == 201

        await wait_until(taken_over, timeout=30, what="the crashed attempt to be taken over")
        async with store.transaction() as tx:
            started_again = await tx.fetchval(f"SELECT started_at FROM {TABLE}")
        assert started_again >= row["lease_until"]  # not taken over before its timeout
        assert set(statuses[:-1]) <= {409}
        replay = await post(session, server.url + ORDERS, LAMP, "k-crash")
        assert (replay.status, replay.replayed) == (201, True)
    assert shop.runs == 1
