"""benchmarks/matrix.py's side-by-side figures: per-cell phase medians and their ratios.

The benchmark itself boots guests; what it computes from the runs' results is
checked here on hand-made runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
CELL = "writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0"


@pytest.fixture
def matrix(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not installed
    return importlib.import_module("benchmarks.matrix")


def run(*cells: tuple[str, str, dict[str, float]]) -> dict[str, Any]:
    return {"cells": [{"id": i, "verdict": v, "timings": t} for i, v, t in cells]}


def test_phase_medians_are_per_cell_and_leave_out_cells_that_errored(matrix: ModuleType) -> None:
    runs = [
        run(
            (CELL, "pass", {"boot": 2.0, "check": 5.0, "total": 9.0}),
            ("fio", "pass", {"boot": 9.0}),
        ),
        run((CELL, "pass", {"boot": 3.0, "check": 0.4, "total": 5.0})),
        run((CELL, "pass", {"boot": 2.5, "check": 0.5, "total": 6.0})),
        run((CELL, "error", {"boot": 100.0, "total": 100.0})),
    ]
    medians = matrix.phase_medians(runs)
    assert medians[CELL]["runs"] == 3
    assert medians[CELL]["errors"] == 1
    assert medians[CELL]["median_seconds"] == {"boot": 2.5, "check": 0.5, "total": 6.0}
    assert medians[CELL]["max_seconds"]["check"] == 5.0
    assert medians["fio"]["median_seconds"] == {"boot": 9.0}


def test_ratios_are_new_over_old_for_the_phases_both_sides_timed(matrix: ModuleType) -> None:
    new = {"median_seconds": {"boot": 2.0, "check": 0.4, "total": 6.0, "crash": 1.0}}
    old = {"median_seconds": {"boot": 2.0, "check": 5.0, "total": 12.0, "cut": 0.0}}
    assert matrix.ratios(new, old) == {"boot": 1.0, "check": 0.08, "total": 0.5}
