"""Deadlines: Timeout sets and enforces one, the tighter wins, and it survives the wire."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from wirework.clock import SYSTEM_CLOCK, ManualClock
from wirework.envelope import Envelope
from wirework.errors import ConfigurationError, DeadlineExceededError, RequestTimeoutError
from wirework.resilience import (
    HTTP_DEADLINE_HEADER,
    Deadline,
    Timeout,
    current_deadline,
    deadline_extension,
    deadline_from_grpc,
    deadline_header,
    deadline_scope,
    grpc_timeout,
    parse_deadline_extension,
    parse_deadline_header,
    run_within,
)
from wirework.service.requests import DEADLINE_EXTENSION, deadline_passed

from .driving import settle


async def test_timeout_cuts_a_call_at_its_deadline_on_the_manual_clock() -> None:
    """A call still running when the clock passes the deadline is cancelled and reported."""
    clock = ManualClock()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    call = asyncio.ensure_future(Timeout(2, clock=clock, name="payments").call(slow))
    await started.wait()
    await clock.advance(1.9)
    assert not call.done()

    await clock.advance(0.1)
    await settle()

    assert call.done()
    assert cancelled.is_set()
    with pytest.raises(DeadlineExceededError, match=r"Timeout\(2s\) on 'payments'") as caught:
        call.result()
    assert isinstance(caught.value, TimeoutError)


async def test_timeout_cuts_a_call_on_the_system_clock() -> None:
    """On the real clock the loop's timer cuts the call (no watcher task)."""

    async def hangs() -> None:
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(DeadlineExceededError):
        await Timeout(0.05, clock=SYSTEM_CLOCK).call(hangs)
    assert loop.time() - began < 5


async def test_a_call_that_ends_in_time_returns_and_leaves_no_deadline_behind() -> None:
    """The result comes back, the deadline was current inside, and it is gone outside."""
    clock = ManualClock()
    seen: list[Deadline | None] = []

    async def quick() -> int:
        seen.append(current_deadline())
        return 7

    assert await Timeout(3, clock=clock).call(quick) == 7
    assert seen[0] is not None
    assert seen[0].at == 3.0
    assert current_deadline() is None
    assert clock.next_deadline() is None  # the watcher is gone as well


async def test_the_tighter_of_inherited_and_new_deadline_wins() -> None:
    """A nested Timeout can shorten the deadline but never extend it."""
    clock = ManualClock()
    seen: list[float] = []

    async def record() -> None:
        deadline = current_deadline()
        assert deadline is not None
        seen.append(deadline.at)

    async def nested(seconds: float) -> None:
        await Timeout(seconds, clock=clock).call(record)

    await Timeout(5, clock=clock).call(lambda: nested(10))
    await Timeout(5, clock=clock).call(lambda: nested(1))

    assert seen == [5.0, 1.0]


async def test_a_passed_deadline_does_not_start_the_call() -> None:
    """When the inherited deadline has passed, the function is never called."""
    clock = ManualClock()
    calls = 0

    async def upstream() -> None:
        nonlocal calls
        calls += 1

    with deadline_scope(Deadline(1.0, clock, source="the caller")):
        await clock.advance(1.0)
        with pytest.raises(DeadlineExceededError, match="not started"):
            await Timeout(10, clock=clock).call(upstream)
        with pytest.raises(DeadlineExceededError, match="the caller"):
            await run_within(current_deadline() or Deadline(0, clock), upstream)

    assert calls == 0


async def test_the_calls_own_timeout_error_is_not_taken_for_the_deadline() -> None:
    """A TimeoutError the call raises itself, before the deadline, passes through as it is."""
    clock = ManualClock()

    async def own_timeout() -> None:
        raise RequestTimeoutError("prices", 0.5)

    with pytest.raises(RequestTimeoutError):
        await Timeout(10, clock=clock).call(own_timeout)


def test_timeout_must_be_positive_and_finite() -> None:
    """No zero, negative or infinite timeout: there is no infinite default."""
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigurationError, match="positive number of seconds"):
            Timeout(bad)


def test_deadline_scope_only_tightens() -> None:
    """A received deadline applies only if it is tighter than the current one."""
    clock = ManualClock()
    with deadline_scope(Deadline(2.0, clock)) as outer:
        with deadline_scope(Deadline(9.0, clock)) as looser:
            assert looser is outer
        with deadline_scope(Deadline(1.0, clock)) as tighter:
            assert tighter is not None
            assert tighter.at == 1.0
        with deadline_scope(None) as unchanged:
            assert unchanged is outer
        assert current_deadline() is outer
    assert current_deadline() is None


def test_http_header_carries_remaining_milliseconds() -> None:
    """The header is the remaining time in whole ms, rounded down, and reads back on the clock."""
    sender = ManualClock()
    receiver = ManualClock()
    assert HTTP_DEADLINE_HEADER == "x-wirework-deadline"

    value = deadline_header(Deadline(1.5009, sender))
    assert value == "1500"
    deadline = parse_deadline_header(value, clock=receiver)
    assert deadline is not None
    assert deadline.remaining() == pytest.approx(1.5)
    assert deadline_header(Deadline(-3, sender)) == "0"
    assert deadline_header(None) is None


@pytest.mark.parametrize("bad", ["", "-5", "1.5", "1e3", "12ms", "1234567890", " ", "٣"])
def test_a_malformed_http_header_is_ignored(bad: str) -> None:
    """A bad header never fails the request; the server's own Timeout applies."""
    assert parse_deadline_header(bad, clock=ManualClock()) is None


def test_grpc_timeout_is_the_remaining_seconds() -> None:
    """gRPC gets remaining seconds as ``timeout=``; the server side reads time_remaining()."""
    clock = ManualClock()
    assert grpc_timeout(Deadline(2.25, clock)) == 2.25
    assert grpc_timeout(Deadline(-1, clock)) == 0.0
    assert grpc_timeout(None) is None

    received = deadline_from_grpc(0.75, clock=clock)
    assert received is not None
    assert received.remaining() == 0.75
    assert deadline_from_grpc(None, clock=clock) is None


async def test_envelope_extension_is_absolute_utc_in_the_request_reply_format() -> None:
    """The extension is ISO UTC, as request-reply writes it, and its reader agrees."""
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    clock = ManualClock(start=start)
    value = deadline_extension(Deadline(2.5, clock))

    assert value == (start + timedelta(seconds=2.5)).isoformat()
    envelope = Envelope(
        id="r1", type="q", source="test", extensions={DEADLINE_EXTENSION: value or ""}
    )
    assert not deadline_passed(envelope, clock.now())
    await clock.advance(2.5)
    assert deadline_passed(envelope, clock.now())

    later = ManualClock(start=start + timedelta(seconds=1))
    received = parse_deadline_extension(value, clock=later)
    assert received is not None
    assert received.remaining() == pytest.approx(1.5)


def test_a_malformed_or_naive_extension_is_ignored() -> None:
    """No UTC offset or not a time at all: no deadline, not an exception."""
    clock = ManualClock()
    assert parse_deadline_extension("tomorrow", clock=clock) is None
    assert parse_deadline_extension("2026-01-01T00:00:02", clock=clock) is None
    assert parse_deadline_extension(None, clock=clock) is None
    assert deadline_extension(None) is None
