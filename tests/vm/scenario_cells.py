"""Run one cell of a shipped scenario in a VM test, and look at its checkers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.commands.run import add_run_arguments, plan_from_args
from harness.crash.runner import run_plan
from harness.proc import live_processes
from harness.report.results import CellResult, load_results

ROOT = Path(__file__).parents[2]
SCENARIOS = ROOT / "scenarios"


def run_scenario_cell(
    tmp_path: Path, image: Any, accel: Any, scenario: str | Path, cell: str
) -> CellResult:
    """`powercut run scenarios/SCENARIO --cell CELL` into tmp_path/out; leaves nothing running.

    SCENARIO is a shipped file's name or any scenario's path.
    """
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [str(SCENARIOS / scenario), "--out", str(out), "--cell", cell, "--accel", accel.value]
    )
    plan = plan_from_args(args)
    assert len(plan.cells) == 1
    # Session-long daemons (libvirtd, started for the libvirt tests) may be alive already.
    before = set(live_processes())
    outcome = run_plan(plan, command="pytest", image=image)
    left = set(live_processes()) - before
    assert not left, f"the runner left processes behind: {left}"
    results = load_results(out)
    assert {"junit.xml", "report.html", "report.md", "results.json"} <= {
        p.name for p in out.iterdir()
    }
    result = results.cells[0]
    assert outcome.ok == (result.verdict == "pass")
    for name in ("console_log", "backend_log", "write_log"):
        assert (out / result.artifacts[name]).exists(), name
    return result


def cell_directory(tmp_path: Path, result: CellResult) -> Path:
    """The cell's own directory (its write log, journal, disk) of a `run_scenario_cell` run."""
    return (tmp_path / "out" / result.artifacts["write_log"]).parent


def checker(result: CellResult, name: str) -> Any:
    return next(c for c in result.checkers if c.name == name)
