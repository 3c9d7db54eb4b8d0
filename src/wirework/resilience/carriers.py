"""A deadline on the wire: the HTTP header, gRPC's ``timeout=``, the envelope extension.

Each writer takes ``current_deadline()`` (or None, and then writes nothing);
each reader returns a ``Deadline`` on the receiver's clock, to install with
``deadline_scope`` around the handler, or None.

* **HTTP** (``x-wirework-deadline``): the *remaining* time in whole
  milliseconds, e.g. ``x-wirework-deadline: 1500``. Relative, like gRPC's
  own ``grpc-timeout``, because an HTTP call is answered while the caller
  waits: a relative budget needs no agreement between the two hosts' wall
  clocks, and the time on the network only makes the callee's view a little
  generous. Up to 9 digits (about 11 days). A malformed value is ignored, as
  a bad ``traceparent`` is (RELIABILITY.md lesson 10): the callee's own
  ``Timeout`` still applies.
* **gRPC**: remaining seconds as the client's ``timeout=`` argument; the
  server reads ``context.time_remaining()``.
* **Messaging** (the ``deadline`` extension, as ``wirework.service.requests``
  writes it): an *absolute* UTC time in ISO 8601 (``datetime.isoformat()``,
  e.g. ``2026-01-01T00:00:02.500000+00:00``). Absolute because a message can
  wait in a queue for any length of time, which a relative budget cannot
  account for; the price is that sender and receiver clocks must agree
  (NTP). A value without a UTC offset is ignored.
"""

from __future__ import annotations

import logging
import math
import re
from datetime import datetime, timedelta

from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.resilience.deadline import Deadline

log = logging.getLogger("wirework.resilience")

HTTP_DEADLINE_HEADER = "x-wirework-deadline"
DEADLINE_EXTENSION = "deadline"

_HEADER_VALUE = re.compile(r"[0-9]{1,9}")


def deadline_header(deadline: Deadline | None) -> str | None:
    """The ``x-wirework-deadline`` value for ``deadline``: remaining whole milliseconds.

    Rounded down, so the callee never believes it has more time than the
    caller; a passed deadline is ``"0"``.
    """
    if deadline is None:
        return None
    return str(max(0, math.floor(deadline.remaining() * 1000)))


def parse_deadline_header(value: str | None, *, clock: Clock = SYSTEM_CLOCK) -> Deadline | None:
    """The deadline an ``x-wirework-deadline`` value gives, on ``clock``; None if absent or bad."""
    if value is None:
        return None
    text = value.strip()
    if not _HEADER_VALUE.fullmatch(text):
        log.debug("ignoring malformed %s header %r", HTTP_DEADLINE_HEADER, value[:40])
        return None
    return Deadline.after(
        int(text) / 1000, clock=clock, source=f"the {HTTP_DEADLINE_HEADER} header"
    )


def grpc_timeout(deadline: Deadline | None) -> float | None:
    """The ``timeout=`` (seconds) for a gRPC call under ``deadline``; None means no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline.remaining())


def deadline_from_grpc(
    time_remaining: float | None, *, clock: Clock = SYSTEM_CLOCK
) -> Deadline | None:
    """The deadline a gRPC server call carries, from ``context.time_remaining()``."""
    if time_remaining is None or not math.isfinite(time_remaining):
        return None
    return Deadline.after(time_remaining, clock=clock, source="the gRPC deadline")


def deadline_extension(deadline: Deadline | None) -> str | None:
    """The envelope's ``deadline`` extension for ``deadline``: absolute UTC, ISO 8601."""
    if deadline is None:
        return None
    moment = deadline.clock.now() + timedelta(seconds=deadline.remaining())
    return moment.isoformat()


def parse_deadline_extension(value: str | None, *, clock: Clock = SYSTEM_CLOCK) -> Deadline | None:
    """The deadline an envelope's ``deadline`` extension gives, on ``clock``; None if bad."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        log.debug("ignoring malformed %s extension %r", DEADLINE_EXTENSION, value[:40])
        return None
    if moment.tzinfo is None:
        log.debug("ignoring %s extension %r without a UTC offset", DEADLINE_EXTENSION, value[:40])
        return None
    remaining = (moment - clock.now()).total_seconds()
    return Deadline.after(remaining, clock=clock, source=f"the message's {DEADLINE_EXTENSION}")
