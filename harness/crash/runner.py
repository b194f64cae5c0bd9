"""The power-cut runner: every cell of a plan, one after another, into one results directory.

`run_plan` boots one guest at a time (the machine has two cores shared with
everyone), gives each cell its own artifact directory
(`RunPlan.cell_directory`), records a `CellResult` per cell and renders every
report at the end — also when the run is interrupted: Ctrl-C stops the cell
that runs (its machine and backend are killed by their owners on the way
out), marks the rest skipped, and still writes results.json and the reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from harness.crash.cell_run import CellRunner, SessionFactory
from harness.crash.images import CellImages
from harness.crash.plan import RunPlan
from harness.crash.record import error_result
from harness.crash.session import CrashSession
from harness.report.render import Rendered, render_all
from harness.report.results import (
    CellResult,
    RunResults,
    Verdict,
    host_info,
    run_results,
    utc_now,
)
from harness.scenario.cells import Cell
from harness.vm.accel import choose_accel
from harness.vm.image import GuestImage

log = logging.getLogger(__name__)


class RunObserver:
    """What a display wants to hear about (the CLI's rich progress; tests listen too)."""

    def cell_started(self, index: int, cell: Cell) -> None:
        """A cell begins."""

    def phase(self, index: int, cell: Cell, phase: str) -> None:
        """A cell enters a phase: boot, workload, cut, reboot, check, crash."""

    def cell_finished(self, index: int, cell: Cell, result: CellResult) -> None:
        """A cell has its verdict."""


@dataclass(frozen=True)
class RunOutcome:
    results: RunResults
    rendered: Rendered
    interrupted: bool

    @property
    def ok(self) -> bool:
        return self.results.ok and not self.interrupted


def run_plan(
    plan: RunPlan,
    *,
    command: str,
    image: GuestImage | None = None,
    images: CellImages | None = None,
    observer: RunObserver | None = None,
    session_factory: SessionFactory = CrashSession,
) -> RunOutcome:
    """Run every cell of `plan`; write DIR/results.json, junit.xml, report.md/html, plots.

    `images` gives each cell its guest image (default: built as the cells ask,
    with `image` standing for the default one).
    """
    observer = observer or RunObserver()
    images = images or CellImages(default=image)
    images.prepare(plan.cells)
    accel = choose_accel(None if plan.accel == "auto" else plan.accel, images(plan.cells[0]).kernel)
    started = utc_now()
    plan.out.mkdir(parents=True, exist_ok=True)
    results: list[CellResult] = []
    interrupted = False
    for index, cell in enumerate(plan.cells):
        if interrupted:
            results.append(
                error_result(
                    cell,
                    "not run: the run was interrupted",
                    verdict=Verdict.SKIPPED,
                    reproduce=plan.reproduce(cell),
                )
            )
            continue
        observer.cell_started(index, cell)
        runner = CellRunner(
            cell,
            plan.cell_directory(index, cell),
            images(cell),
            accel=accel,
            out=plan.out,
            reproduce=plan.reproduce(cell),
            on_phase=_phase_callback(observer, index, cell),
            session_factory=session_factory,
        )
        try:
            result = runner.run()
        except KeyboardInterrupt:
            interrupted = True
            result = error_result(
                cell,
                "interrupted (Ctrl-C) while running",
                verdict=Verdict.SKIPPED,
                timings=runner.timer.total(),
                reproduce=plan.reproduce(cell),
            )
        log.info("cell %s: %s — %s", cell.id, result.verdict, result.reason)
        results.append(result)
        observer.cell_finished(index, cell, result)
    run = run_results(results, started=started, command=command, host=host_info(accel.value))
    rendered = render_all(run, plan.out)
    return RunOutcome(run, rendered, interrupted)


def _phase_callback(observer: RunObserver, index: int, cell: Cell) -> Callable[[str], None]:
    return lambda phase: observer.phase(index, cell, phase)
