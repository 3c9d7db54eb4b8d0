"""Figures, their targets and the plain-text table they are printed in (readable in a log)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Every throughput figure must reach this share of its floor.
MIN_FLOOR_RATIO = 0.5


@dataclass
class Figure:
    """One measured number, its floor (same SQL with plain sqlite3) and its target."""

    key: str
    title: str
    value: float
    unit: str
    floor: float | None = None
    higher_is_better: bool = True
    target: float | None = None
    min_ratio: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.floor <= 0:
            return None
        return self.value / self.floor

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
            missed.append("floor ratio")
        return missed

    @property
    def verdict(self) -> str:
        if self.target is None and self.min_ratio is None:
            return "info"
        missed = self.misses
        return f"FAIL ({', '.join(missed)})" if missed else "PASS"

    def target_text(self) -> str:
        parts = []
        if self.target is not None:
            sign = ">=" if self.higher_is_better else "<"
            parts.append(f"{sign} {format_value(self.target, self.unit)}")
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g} x floor")
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
    return f"{value:g} {unit}"


def table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned plain-text table, then each figure's notes."""
    header = ("#", "figure", "wirework", "floor", "ratio", "target", "verdict")
    rows = [header]
    for figure in figures:
        ratio = figure.ratio
        rows.append(
            (
                figure.key,
                figure.title,
                format_value(figure.value, figure.unit),
                "-" if figure.floor is None else format_value(figure.floor, figure.unit),
                "-" if ratio is None else f"{ratio:.2f}",
                figure.target_text(),
                figure.verdict,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    right = {2, 3, 4}
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
