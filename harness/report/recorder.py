"""The one writer of a results directory, for `powercut run` and for scenario cells in pytest.

A run's results directory must say at every moment what the run has
reached: results.json and junit.xml are rewritten (atomically) as soon as
the plan is known and after every cell, so a run killed at a CI time limit
keeps every verdict it reached, and its plan names the cells that never
ran; the Markdown, HTML and plots come at the end. `powercut run`
(`harness.crash.runner`) and pytest's scenario items
(`harness.pytest_scenarios`, where the xdist controller is the one writer)
both keep their results here, so both directories read the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from harness.report.render import Rendered, render_all, write_progress
from harness.report.results import (
    CellKey,
    CellResult,
    RunResults,
    ScenarioRef,
    Shard,
    host_info,
    key_of,
    run_results,
    utc_now,
)


class ResultsRecorder:
    """The results of one run as they come in, in the plan's order, written after each."""

    def __init__(
        self, out: Path, command: str, *, accel: str | None = None, shard: Shard | None = None
    ) -> None:
        self.out = Path(out)
        self.command = command
        self.accel = accel  # the accelerator the run's machines use (for `host`)
        self.shard = shard
        self.started = utc_now()
        self.planned: list[CellKey] = []
        self.scenarios: dict[str, ScenarioRef] = {}  # by path: each scenario file once
        self.results: dict[CellKey, CellResult] = {}

    def plan(self, keys: Iterable[CellKey], scenarios: Iterable[ScenarioRef] = ()) -> None:
        """Cells (and the scenario files they come from) the run means to run; written at once."""
        for key in keys:
            if key not in self.planned:
                self.planned.append(key)
        for ref in scenarios:
            self.scenarios.setdefault(ref.path, ref)
        self.write()

    def record(self, result: CellResult) -> None:
        """A cell's result (a cell nobody planned joins the plan at its end)."""
        key = key_of(result)
        if key not in self.planned:
            self.planned.append(key)
        self.results[key] = result
        self.write()

    def snapshot(self, complete: bool) -> RunResults:
        order = {k: i for i, k in enumerate(self.planned)}
        cells = sorted(self.results.values(), key=lambda c: order[key_of(c)])
        return run_results(
            cells,
            started=self.started,
            command=self.command,
            host=host_info(self.accel),
            scenarios=list(self.scenarios.values()),
            planned=self.planned,
            shard=self.shard,
            complete=complete,
        )

    def write(self) -> None:
        """results.json and junit.xml as they stand (cheap: no plots)."""
        write_progress(self.snapshot(complete=False), self.out)

    def finish(
        self, unrun: Callable[[CellKey], CellResult] | None = None
    ) -> tuple[RunResults, Rendered]:
        """The whole run, every report rendered; `unrun` gives a result to each planned cell
        that has none (a skipped one, when the run was interrupted)."""
        if unrun is not None:
            for key in self.planned:
                if key not in self.results:
                    self.results[key] = unrun(key)
        results = self.snapshot(complete=True)
        return results, render_all(results, self.out)
