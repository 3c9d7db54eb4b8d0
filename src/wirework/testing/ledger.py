"""The client-observed ledger of a fault test, and the checker that judges it.

This follows the Jepsen method (RELIABILITY.md §2.0): the oracle is what the
*clients* saw, never the broker's own counters. Every process of a test
appends one line per event to its own file, and fsyncs it before going on,
so a ``kill -9`` loses at most the event it was in the middle of:

* a publisher writes ``invoke <id>`` before it publishes, then ``ok <id>``
  once ``publish`` returned, ``fail <id>`` for a definite error (the broker
  says nothing was stored) or ``info <id>`` for an unknown outcome. An
  ``invoke`` with no outcome (the process died in between) counts as ``info``;
* a consumer writes ``received`` when a delivery is handed to it,
  ``invoked`` when its handler starts, ``handled`` when the handler returned,
  and ``acked`` once ``ack()`` returned (also ``nacked``, ``dead_lettered``,
  ``ack_failed``). An ack begun without waiting (``Delivery.start_ack``) is
  written ``acking`` first; if its process dies before the outcome, the ack is
  of unknown outcome (``ack_unknown``), as an ``invoke`` without outcome is:
  the handler finished, and the message either comes back or its ack held.

``check`` turns the files and the broker's dead letters into the counts of
§2.0 (``lost``, ``unexpected``, ``failed_but_present``, ``recovered``,
``redeliveries``, ...), and ``drain`` waits for the final drain phase.

A line is ``<kind> <id> <monotonic time> [name=value ...]``. The time is
``time.monotonic()``, which on Linux is one clock for every process, so times
from different processes compare.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from wirework.brokers.base import DeadLetterStore

#: Suffix of ledger files; ``History.read`` reads every file with it in a directory.
SUFFIX = ".ledger"

#: What a consumer records as the message's effect until an inbox exists:
#: the handler completed *and* the ack returned.
DEFAULT_EFFECT = "acked"

_DEAD_LETTER_LIMIT = 1_000_000


class LedgerFile:
    """One process's append-only ledger: one line per event, fsynced before returning.

    Writes go straight to the file descriptor (no user-space buffer), so a
    process killed at any instruction leaves every earlier line complete.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, kind: str, message_id: str, **fields: object) -> float:
        """Append one event and fsync it; returns the monotonic time written."""
        if self._fd is None:
            raise ValueError(f"ledger {self.path} is closed")
        at = time.monotonic()
        parts = [_token(kind), _token(message_id), f"{at:.6f}"]
        parts.extend(f"{_token(name)}={_token(str(value))}" for name, value in fields.items())
        os.write(self._fd, (" ".join(parts) + "\n").encode())
        os.fsync(self._fd)
        return at

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _token(text: str) -> str:
    """Keep a value on one line and in one field."""
    return "".join("_" if char.isspace() else char for char in text) or "-"


@dataclass(frozen=True, slots=True)
class Record:
    """One ledger line; ``process`` is the name of the file it came from."""

    process: str
    kind: str
    id: str
    at: float
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class History:
    """Every record of every process of one test, in file order per process."""

    records: tuple[Record, ...]

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> History:
        """Read every ``*.ledger`` file; an unfinished last line (a kill mid-write) is skipped."""
        records: list[Record] = []
        for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
            records.extend(parse(path.read_text(errors="replace"), process=path.stem))
        return cls(tuple(records))

    def of(self, *kinds: str, process: str | None = None) -> list[Record]:
        """Records of these kinds, optionally from one process only."""
        return [
            r for r in self.records if r.kind in kinds and (process is None or r.process == process)
        ]

    def ids(self, kind: str, *, process: str | None = None) -> set[str]:
        return {r.id for r in self.of(kind, process=process)}

    def counts(self, kind: str) -> Counter[str]:
        """How many ``kind`` records each id has."""
        return Counter(r.id for r in self.of(kind))

    def processes(self) -> list[str]:
        return sorted({r.process for r in self.records})


def parse(text: str, *, process: str) -> list[Record]:
    """Parse one ledger file's text."""
    lines = text.split("\n")
    # The last element is "" after a complete final line, or a torn line.
    records: list[Record] = []
    for line in lines[:-1]:
        parts = line.split(" ")
        if len(parts) < 3:
            continue
        fields = dict(part.split("=", 1) for part in parts[3:] if "=" in part)
        records.append(Record(process, parts[0], parts[1], float(parts[2]), fields))
    return records


@dataclass(frozen=True)
class LedgerCheck:
    """The §2.0 counts of one run, with the ids behind each, from client-observed records.

    ``failed_but_present`` is stricter than the table in §2.0 (``effected ∩
    fail``): an id whose publish failed must not be *seen* at all, not even
    invoked or dead-lettered, since the broker said it stored nothing.
    """

    attempted: frozenset[str]
    acked: frozenset[str]
    failed: frozenset[str]
    indeterminate: frozenset[str]
    invocations: Counter[str]
    effects: Counter[str]
    dead_lettered: Counter[str]
    ack_unknown: frozenset[str] = frozenset()
    """Handled, its ack begun, its process gone before the outcome (``acked`` effect only)."""

    @property
    def invoked(self) -> frozenset[str]:
        return frozenset(self.invocations)

    @property
    def effected(self) -> frozenset[str]:
        return frozenset(self.effects)

    @property
    def dlq(self) -> frozenset[str]:
        return frozenset(self.dead_lettered)

    @property
    def lost(self) -> frozenset[str]:
        return self.acked - (self.effected | self.dlq | self.ack_unknown)

    @property
    def unexpected(self) -> frozenset[str]:
        return (self.effected | self.dlq | self.invoked) - self.attempted

    @property
    def failed_but_present(self) -> frozenset[str]:
        return self.failed & (self.effected | self.dlq | self.invoked)

    @property
    def recovered(self) -> frozenset[str]:
        return self.indeterminate & (self.effected | self.dlq)

    @property
    def dup_effects(self) -> frozenset[str]:
        return frozenset(one for one, count in self.effects.items() if count > 1)

    @property
    def redeliveries(self) -> int:
        return sum(self.invocations.values()) - len(self.invocations)

    def counts(self) -> dict[str, int]:
        """The §2.0 table as numbers, in its order."""
        return {
            "attempted": len(self.attempted),
            "acked": len(self.acked),
            "failed": len(self.failed),
            "info": len(self.indeterminate),
            "invoked": len(self.invoked),
            "invocations": sum(self.invocations.values()),
            "effected": len(self.effected),
            "dlq": len(self.dlq),
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "dup_effects": len(self.dup_effects),
            "failed_but_present": len(self.failed_but_present),
            "recovered": len(self.recovered),
            "redeliveries": self.redeliveries,
            "ack_unknown": len(self.ack_unknown),
        }

    def __str__(self) -> str:
        text = " ".join(f"{name}={value}" for name, value in self.counts().items())
        for name in ("lost", "unexpected", "failed_but_present"):
            ids: frozenset[str] = getattr(self, name)
            if ids:
                text += f"\n  {name}: {', '.join(sorted(ids)[:20])}"
        return text


def check(
    history: History,
    dead_lettered: Iterable[str] = (),
    *,
    effect: str = DEFAULT_EFFECT,
) -> LedgerCheck:
    """Judge a history; ``dead_lettered`` is one message id per dead-letter record.

    Args:
        history: the records of every process of the run.
        dead_lettered: message ids read from the broker's dead letters.
        effect: the record kind that counts as a committed effect (``acked``
            until an inbox writes effect rows).
    """
    publishes = history.of("invoke", "ok", "fail", "info")
    attempted = {r.id for r in publishes}
    acked = {r.id for r in publishes if r.kind == "ok"}
    failed = {r.id for r in publishes if r.kind == "fail"} - acked
    ack_unknown: frozenset[str] = frozenset()
    if effect == DEFAULT_EFFECT:
        answered = {(r.process, r.id) for r in history.of("acked", "ack_failed")}
        ack_unknown = frozenset(
            r.id for r in history.of("acking") if (r.process, r.id) not in answered
        ) - set(history.counts(effect))
    return LedgerCheck(
        attempted=frozenset(attempted),
        acked=frozenset(acked),
        failed=frozenset(failed),
        indeterminate=frozenset(attempted - acked - failed),
        invocations=history.counts("invoked"),
        effects=history.counts(effect),
        dead_lettered=Counter(dead_lettered),
        ack_unknown=ack_unknown,
    )


async def dead_lettered_ids(
    store: DeadLetterStore, *, topic: str | None = None, group: str | None = None
) -> list[str]:
    """One message id per dead-letter record; a record without one gets a unique placeholder.

    The placeholder is never an attempted id, so such a record shows up as
    ``unexpected``.
    """
    letters = await store.dead_letters(topic=topic, group=group, limit=_DEAD_LETTER_LIMIT)
    return [
        letter.message_id if letter.message_id else f"<dead letter {letter.id} has no id>"
        for letter in letters
    ]


async def drain(
    directory: str | os.PathLike[str],
    store: DeadLetterStore,
    *,
    quiet: float,
    timeout: float,
    topic: str | None = None,
    group: str | None = None,
    effect: str = DEFAULT_EFFECT,
    idle: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.05,
) -> LedgerCheck:
    """Wait for the drain phase to end, then return the final check.

    The drain ends when every acked publish is effected or dead-lettered, no
    begun ack is still unanswered (and,
    if ``idle`` is given, it also says the broker has nothing left, so that
    publishes of unknown outcome can still show up as ``recovered``), or when
    no new invocation has been recorded for ``quiet`` seconds (use 2 x the
    lease), or after ``timeout`` seconds at the latest. Start it once the
    publishers have finished or been killed. ``idle`` only decides when to
    stop waiting; the counts come from the ledger and the dead letters alone.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = -1
    changed = loop.time()
    while True:
        # Dead letters first: what a consumer recorded before dead-lettering a message
        # (its last invocation) is then in the ledger read next. The other way round,
        # a message dead-lettered between the two reads counts one invocation short.
        dead = await dead_lettered_ids(store, topic=topic, group=group)
        result = check(History.read(directory), dead, effect=effect)
        now = loop.time()
        if now >= deadline:
            return result
        # An ack begun and not yet answered may be one a live consumer is about to
        # record (its commit is what made the broker idle): not an end, unless quiet.
        if not result.lost and not result.ack_unknown and (idle is None or await idle()):
            return result
        total = sum(result.invocations.values())
        if total != seen:
            seen, changed = total, now
        elif now - changed >= quiet:
            return result
        await asyncio.sleep(poll)
