"""The matrix square's words: what its cells' checkers observed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from harness.report.grid import Square
from harness.report.results import CellResult, CheckerResult, RunResults

Synth = Callable[..., RunResults]


def _with(cell: CellResult, *, lost: int, caught_by: tuple[str, ...]) -> CellResult:
    checkers = tuple(
        CheckerResult(name, "intact", "pass", name in caught_by, "")
        for name in ("oracle", "ack-records")
    )
    return dataclasses.replace(cell, verdict="pass", lost=lost, corrupt=0, checkers=checkers)


def test_a_square_names_a_loss_a_workload_caught_when_the_sectors_show_none(
    synthetic: Synth,
) -> None:
    cell = synthetic().cells[0]
    assert Square((_with(cell, lost=0, caught_by=()),)).observed == "nothing lost"
    caught = Square((_with(cell, lost=0, caught_by=("ack-records",)),))
    assert caught.observed == "loss seen by ack-records"
    both = Square((_with(cell, lost=3, caught_by=("oracle", "ack-records")),))
    assert both.observed == f"3 {cell.loss_unit} lost; loss seen by ack-records, oracle"
