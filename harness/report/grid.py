"""The matrix view of a run: cache modes down, fault x workload across.

Cells that share a mode, fault (with policy) and workload — other cuts,
repetitions or scenarios — fold into one square of the grid, which shows
how many of them passed and what was expected of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.durability.contract import Promise
from harness.report.results import CellResult

MODE_ORDER = ("writethrough", "directsync", "writeback", "none", "unsafe")
VERDICT_ORDER = ("error", "fail", "skipped", "pass")  # the worst verdict wins a square


def short_promise(text: str) -> str:
    """A cell's promise as a square has room for it (results from other versions: as written)."""
    try:
        return Promise(text).label
    except ValueError:
        return text


@dataclass(frozen=True)
class Square:
    cells: tuple[CellResult, ...]

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.cells}
        return next((v for v in VERDICT_ORDER if v in verdicts), "skipped")

    @property
    def passed(self) -> int:
        return sum(1 for c in self.cells if c.passed)

    @property
    def expected(self) -> str:
        labels = {
            "loss detected" if c.negative_control else short_promise(c.promise) for c in self.cells
        }
        return " / ".join(sorted(labels))

    @property
    def observed(self) -> str:
        judged = [c for c in self.cells if c.verdict in ("pass", "fail")]
        if not judged:
            return "no result"
        lost = sum(c.lost for c in judged)
        corrupt = sum(c.corrupt for c in judged)
        units = {c.loss_unit for c in judged}
        unit = units.pop() if len(units) == 1 else "units"
        # The figures are the first checker's (the oracle's sectors): a loss another
        # checker saw (a negative control's tokens, unflushed writes a mode may lose)
        # is named beside them.
        seen_by = sorted({ch.name for c in judged for ch in c.checkers if ch.loss_detected})
        if not lost and not corrupt:
            return f"loss seen by {', '.join(seen_by)}" if seen_by else "nothing lost"
        text = f"{lost} {unit} lost" + (f", {corrupt} corrupt" if corrupt else "")
        return text if not seen_by else f"{text}; loss seen by {', '.join(seen_by)}"

    @property
    def label(self) -> str:
        n = len(self.cells)
        word = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "skipped": "skipped"}[
            self.verdict
        ]
        return word if n == 1 else f"{word} ({self.passed}/{n})"


@dataclass(frozen=True)
class Grid:
    modes: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (fault label, workload)
    squares: dict[tuple[str, str, str], Square]  # (mode, fault label, workload)

    def square(self, mode: str, column: tuple[str, str]) -> Square | None:
        return self.squares.get((mode, *column))


def build_grid(cells: Sequence[CellResult]) -> Grid:
    modes = sorted(
        {c.mode for c in cells},
        key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else len(MODE_ORDER),
    )
    columns: list[tuple[str, str]] = []
    groups: dict[tuple[str, str, str], list[CellResult]] = {}
    for c in cells:
        column = (c.fault_label, c.workload)
        if column not in columns:
            columns.append(column)
        groups.setdefault((c.mode, *column), []).append(c)
    squares = {k: Square(tuple(v)) for k, v in groups.items()}
    return Grid(tuple(modes), tuple(columns), squares)
