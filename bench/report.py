"""Figures, their targets and the plain-text table they are printed in (readable in a log)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Every throughput figure must reach this share of its floor.
MIN_FLOOR_RATIO = 0.5


@dataclass
class Figure:
    """One measured number, its floor (same SQL with plain sqlite3) and its target.

    ``floor`` is whatever the figure is held against, named by ``floor_name``: the
    raw-sqlite3 floor, the broker's raw client, a raw ``Consumer``. ``peer`` is an
    optional second reference (FastStream doing the same work).
    """

    key: str
    title: str
    value: float
    unit: str
    floor: float | None = None
    higher_is_better: bool = True
    target: float | None = None
    min_ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    floor_name: str = "floor"
    max_ratio: float | None = None
    """Largest allowed value / floor (for figures where lower is better)."""
    peer: float | None = None
    peer_name: str = "peer"
    min_peer_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.floor <= 0:
            return None
        return self.value / self.floor

    @property
    def peer_ratio(self) -> float | None:
        if self.peer is None or self.peer <= 0:
            return None
        return self.value / self.peer

    @property
    def misses(self) -> list[str]:
        """What the figure falls short of; empty when it meets every target."""
        missed = []
        if self.target is not None:
            met = self.value >= self.target if self.higher_is_better else self.value < self.target
            if not met:
                missed.append("target")
        ratio = self.ratio
        if self.min_ratio is not None and ratio is not None and ratio < self.min_ratio:
            missed.append(f"{self.floor_name} ratio")
        if self.max_ratio is not None and ratio is not None and ratio > self.max_ratio:
            missed.append(f"{self.floor_name} ratio")
        peer_ratio = self.peer_ratio
        if (
            self.min_peer_ratio is not None
            and peer_ratio is not None
            and peer_ratio < self.min_peer_ratio
        ):
            missed.append(f"{self.peer_name} ratio")
        return missed

    @property
    def verdict(self) -> str:
        judged = (self.target, self.min_ratio, self.max_ratio, self.min_peer_ratio)
        if all(limit is None for limit in judged):
            return "info"
        missed = self.misses
        return f"FAIL ({', '.join(missed)})" if missed else "PASS"

    def target_text(self) -> str:
        parts = []
        if self.target is not None:
            sign = ">=" if self.higher_is_better else "<"
            parts.append(f"{sign} {format_value(self.target, self.unit)}")
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g} x {self.floor_name}")
        if self.max_ratio is not None:
            parts.append(f"<= {self.max_ratio:g} x {self.floor_name}")
        if self.min_peer_ratio is not None:
            parts.append(f">= {self.min_peer_ratio:g} x {self.peer_name}")
        return "; ".join(parts) or "-"


def format_value(value: float, unit: str) -> str:
    if unit == "msg/s":
        return f"{value:,.0f} msg/s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "sagas/s":
        return f"{value:,.1f} sagas/s"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:g} {unit}"


def table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned plain-text table, then each figure's notes.

    The reference column is headed by the figures' ``floor_name`` (``floor`` unless
    they name another); a peer and its ratio get two more columns when any figure has one.
    """
    names = {figure.floor_name for figure in figures if figure.floor is not None}
    reference = names.pop() if len(names) == 1 else "floor" if not names else "reference"
    peers = {figure.peer_name for figure in figures if figure.peer is not None}
    with_peer = bool(peers)
    peer_header = peers.pop() if len(peers) == 1 else "peer"
    header: tuple[str, ...] = ("#", "figure", "wirework", reference, "ratio")
    if with_peer:
        header += (peer_header, "ratio")
    header += ("target", "verdict")
    rows = [header]
    for figure in figures:
        ratio = figure.ratio
        row: tuple[str, ...] = (
            figure.key,
            figure.title,
            format_value(figure.value, figure.unit),
            "-" if figure.floor is None else format_value(figure.floor, figure.unit),
            "-" if ratio is None else f"{ratio:.2f}",
        )
        if with_peer:
            peer_ratio = figure.peer_ratio
            row += (
                "-" if figure.peer is None else format_value(figure.peer, figure.unit),
                "-" if peer_ratio is None else f"{peer_ratio:.2f}",
            )
        rows.append((*row, figure.target_text(), figure.verdict))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    right = {2, 3, 4, 5, 6} if with_peer else {2, 3, 4}
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[column]) if column in right else cell.ljust(widths[column])
            for column, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    notes = [
        f"{figure.key:<3} {note}" if number == 0 else f"    {note}"
        for figure in figures
        for number, note in enumerate(figure.notes)
    ]
    if notes:
        lines += ["", "notes", *notes]
    return "\n".join(lines)


def summary(figures: Sequence[Figure]) -> str:
    judged = [figure for figure in figures if figure.verdict != "info"]
    failed = [figure.key for figure in judged if figure.misses]
    if not failed:
        return f"all {len(judged)} judged figures PASS"
    passed = len(judged) - len(failed)
    return f"{passed} of {len(judged)} judged figures PASS; FAIL: {', '.join(failed)}"
