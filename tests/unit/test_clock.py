"""Clocks: ManualClock moves only when told, in deadline order; SystemClock is the real time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from wirework.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock

START = datetime(2026, 1, 1, tzinfo=UTC)


async def sleeper(
    clock: ManualClock, seconds: float, name: str, woke: list[tuple[str, float]]
) -> None:
    await clock.sleep(seconds)
    woke.append((name, clock.monotonic()))


async def test_sleepers_wake_in_deadline_order_only_when_advanced_past() -> None:
    """Sleepers started out of order wake by deadline, each at its deadline, and not before."""
    clock = ManualClock()
    woke: list[tuple[str, float]] = []
    async with asyncio.TaskGroup() as group:
        for name, seconds in [("c", 3.0), ("a", 1.0), ("b", 2.0)]:
            group.create_task(sleeper(clock, seconds, name, woke))
        await asyncio.sleep(0)  # let every task reach its sleep

        await clock.advance(0.75)
        assert woke == []

        await clock.advance(0.25)
        assert woke == [("a", 1.0)]

        await clock.advance(5)
        assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert clock.monotonic() == 6.0


async def test_equal_deadlines_wake_in_the_order_they_slept() -> None:
    """Sleepers with the same deadline wake first come, first served."""
    clock = ManualClock()
    woke: list[tuple[str, float]] = []
    async with asyncio.TaskGroup() as group:
        for name in "xyz":
            group.create_task(sleeper(clock, 1.0, name, woke))
        await asyncio.sleep(0)
        await clock.advance(1.0)

    assert [name for name, _ in woke] == ["x", "y", "z"]


async def test_a_sleeper_that_sleeps_again_wakes_again_within_one_advance() -> None:
    """One long advance runs a periodic task once per period, at the right times."""
    clock = ManualClock()
    ticks: list[float] = []

    async def every_second() -> None:
        for _ in range(3):
            await clock.sleep(1.0)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(every_second())
    await asyncio.sleep(0)
    await clock.advance(3.5)

    assert ticks == [1.0, 2.0, 3.0]
    await task


async def test_advance_moves_monotonic_and_wall_together() -> None:
    """advance moves both clocks by the same amount, sleepers or not."""
    clock = ManualClock(start=START)

    await clock.advance(90)

    assert clock.monotonic() == 90
    assert clock.now() == START + timedelta(seconds=90)


async def test_wall_time_seen_by_a_woken_sleeper_is_its_deadline() -> None:
    """A sleeper that wakes mid-advance sees the wall clock at its own deadline."""
    clock = ManualClock(start=START)
    seen: list[datetime] = []

    async def note_wall() -> None:
        await clock.sleep(10)
        seen.append(clock.now())

    task = asyncio.create_task(note_wall())
    await asyncio.sleep(0)
    await clock.advance(60)
    await task

    assert seen == [START + timedelta(seconds=10)]
    assert clock.now() == START + timedelta(seconds=60)


async def test_jump_wall_moves_now_but_not_monotonic_nor_sleepers() -> None:
    """A wall-clock jump (NTP step) changes now() only: no duration and no sleeper moves."""
    clock = ManualClock(start=START)
    woke: list[tuple[str, float]] = []
    task = asyncio.create_task(sleeper(clock, 1.0, "lease", woke))
    await asyncio.sleep(0)

    clock.jump_wall(3600)
    await asyncio.sleep(0)
    assert clock.now() == START + timedelta(hours=1)
    assert clock.monotonic() == 0.0
    assert woke == []

    clock.jump_wall(-7200)
    assert clock.now() == START - timedelta(hours=1)
    assert clock.monotonic() == 0.0

    await clock.advance(1.0)
    await task
    assert woke == [("lease", 1.0)]


async def test_zero_and_negative_sleeps_return_without_advancing() -> None:
    """sleep(0) and sleep(-1) only yield; they neither wait for advance nor move time."""
    clock = ManualClock()

    async with asyncio.timeout(1):
        await clock.sleep(0)
        await clock.sleep(-1)

    assert clock.monotonic() == 0.0


async def test_a_cancelled_sleeper_does_not_break_advance() -> None:
    """Advancing past a sleeper whose task was cancelled wakes the others normally."""
    clock = ManualClock()
    woke: list[tuple[str, float]] = []
    cancelled = asyncio.create_task(sleeper(clock, 1.0, "gone", woke))
    kept = asyncio.create_task(sleeper(clock, 2.0, "kept", woke))
    await asyncio.sleep(0)

    cancelled.cancel()
    await asyncio.sleep(0)
    await clock.advance(2.0)
    await kept

    assert cancelled.cancelled()
    assert woke == [("kept", 2.0)]


def test_manual_clock_starts_at_a_fixed_aware_time() -> None:
    """Without a start, now() is 2026-01-01 UTC, timezone-aware; a start is honoured."""
    assert ManualClock().now() == START
    assert ManualClock().now().tzinfo is not None
    custom = datetime(2030, 6, 1, 12, tzinfo=UTC)
    assert ManualClock(start=custom).now() == custom
    assert ManualClock().monotonic() == 0.0


def test_both_clocks_satisfy_the_protocol() -> None:
    """ManualClock and SystemClock can stand wherever a Clock is expected."""
    assert isinstance(ManualClock(), Clock)
    assert isinstance(SystemClock(), Clock)
    assert isinstance(SYSTEM_CLOCK, SystemClock)


def test_system_clock_monotonic_never_goes_back() -> None:
    """SystemClock.monotonic only moves forward."""
    readings = [SYSTEM_CLOCK.monotonic() for _ in range(1000)]

    assert readings == sorted(readings)


def test_system_clock_now_is_aware_utc_and_current() -> None:
    """SystemClock.now is timezone-aware UTC and agrees with the real wall clock."""
    before = datetime.now(UTC)
    now = SYSTEM_CLOCK.now()
    after = datetime.now(UTC)

    assert now.utcoffset() == timedelta(0)
    assert before <= now <= after


async def test_system_clock_zero_and_negative_sleeps_only_yield() -> None:
    """SystemClock.sleep(0) and sleep(-5) return at once, letting other tasks run."""
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    started = SYSTEM_CLOCK.monotonic()
    async with asyncio.timeout(1):
        await SYSTEM_CLOCK.sleep(0)
        await SYSTEM_CLOCK.sleep(-5)

    assert ran == ["other"]
    assert SYSTEM_CLOCK.monotonic() - started < 0.5
    await task
