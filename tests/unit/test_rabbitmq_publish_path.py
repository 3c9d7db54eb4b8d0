"""The RabbitMQ backend's publish-path pieces that need no server: the window, the headers.

Every publish passes through ``Window`` (take a place, or wait for one, then
give it back) and ``outgoing_headers``; every delivery through
``split_headers``. Their fast paths skip work in the common case, so these
check the cases a shortcut could get wrong: places handed over in order and
never lost to a waiter that gave up, reserved headers still told apart.
"""

from __future__ import annotations

import asyncio

import pytest

from wirework.brokers.rabbitmq_link import Window
from wirework.brokers.rabbitmq_names import (
    DELAY_HEADER,
    STATE_HEADER,
    Meta,
    check_headers,
    outgoing_headers,
    split_headers,
)
from wirework.envelope import WireMessage
from wirework.errors import ConfigurationError, DeadlineExceededError


async def _settle() -> None:
    """Let every ready callback and task step run (a handed-over place reaches its waiter)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_places_are_taken_without_waiting_until_the_window_is_full() -> None:
    window = Window(2)
    assert window.take()
    assert window.take()
    assert not window.take()
    window.give()
    assert window.take()


async def test_waiters_get_places_in_arrival_order_and_a_newcomer_does_not_jump_the_queue() -> None:
    window = Window(1)
    assert window.take()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await window.wait(None)
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await _settle()
    window.give()  # to waiter 0, directly
    assert not window.take()  # a newcomer waits behind the others
    await _settle()
    window.give()
    await _settle()
    window.give()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    window.give()
    assert window.take()


async def test_a_wait_past_its_deadline_fails_and_leaves_no_place_behind() -> None:
    window = Window(1)
    assert window.take()
    until = asyncio.get_running_loop().time() + 0.02
    with pytest.raises(DeadlineExceededError, match="nothing was sent"):
        await window.wait(until)
    window.give()
    assert window.take()  # the place came back, not to the waiter that gave up


async def test_a_waiter_cancelled_as_its_place_arrives_passes_the_place_on() -> None:
    window = Window(1)
    assert window.take()
    first = asyncio.create_task(window.wait(None))
    second = asyncio.create_task(window.wait(None))
    await _settle()
    window.give()  # handed to ``first``, which is cancelled before it runs
    first.cancel()
    await _settle()
    assert first.cancelled()
    assert second.done()  # the place went on to the next waiter
    assert second.result() >= 0.0
    window.give()
    assert window.take()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    window = Window(1)
    assert window.take()
    waiting = asyncio.create_task(window.wait(None))
    await _settle()
    waiting.cancel()
    await _settle()
    window.give()
    assert window.take()  # free again: nobody left in front


def test_user_headers_come_back_exactly_and_reserved_ones_are_told_apart() -> None:
    message = WireMessage(
        headers={"ce-id": "1", "content-type": "application/json", "x-custom": "y", "CCx": "z"},
        body=b"{}",
    )
    headers = outgoing_headers(message, Meta(key="k", attempts=2).table())
    headers["x-delivery-count"] = 3  # what a quorum queue adds on redelivery
    headers["x-death"] = [{"queue": "q"}]
    headers[DELAY_HEADER] = "queue"
    headers["bytes"] = b"\xff"  # a non-UTF-8 long string comes back as bytes
    user, state, count = split_headers(headers)
    assert dict(user.headers) == {**message.headers, "bytes": "\udcff"}
    assert Meta.from_table(state) == Meta(key="k", attempts=2)
    assert count == 3


def test_a_first_copy_without_a_key_has_no_state_table() -> None:
    message = WireMessage(headers={"ce-id": "1"}, body=b"{}")
    headers = outgoing_headers(message, Meta().table())
    assert STATE_HEADER not in headers
    user, state, count = split_headers(headers)
    assert (dict(user.headers), state, count) == ({"ce-id": "1"}, {}, 0)


@pytest.mark.parametrize("name", ["x-death", "CC", "BCC", f"{STATE_HEADER}-x", DELAY_HEADER])
def test_reserved_header_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        check_headers({name: "v"})


def test_a_header_name_is_measured_in_utf8_bytes() -> None:
    check_headers({"é" * 127: "v"})  # 254 bytes
    with pytest.raises(ConfigurationError, match="255 bytes"):
        check_headers({"é" * 128: "v"})  # 256 bytes in 128 characters
    with pytest.raises(ConfigurationError, match="255 bytes"):
        check_headers({"😀" * 64: "v"})  # 256 bytes in 64 characters
