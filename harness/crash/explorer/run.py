"""One `powercut explore` run: which cells it explores, and its explore.json as it goes.

A scenario's cells fold into exploration cells (`exploration_cells`): its
faults and cut policies fall away, since every host power cut the contract
allows is a candidate state, so one exploration covers a mode, workload,
cut and repetition. `ExploreDoc` writes DIR/explore.json from the engine's
records (`harness.explore.doc`) while cells run: each cell hands it a
source of its current `CellRecord`, and the file is rewritten atomically at
most every `interval` seconds, so an interrupted run keeps what it checked.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.durability.contract import Verdict
from harness.explore.doc import DOC_NAME, CellRecord, CellStatus, Counts, ExploreDocument
from harness.explore.spec import ExploreSpec
from harness.report.results import utc_now
from harness.scenario.cells import Cell
from harness.scenario.model import Scenario

CellSource = CellRecord | Callable[[], CellRecord]


def exploration_cells(scenarios: Sequence[Scenario], cells: Sequence[Cell]) -> list[Cell]:
    """One cell per (scenario, mode, workload, cut, repetition): faults and policies fold away."""
    seen: set[tuple[str, str]] = set()
    out = []
    for cell in cells:
        key = (cell.scenario_path, cell.exploration_id)
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def spec_for(cell: Cell, scenarios: Sequence[Scenario]) -> ExploreSpec:
    """The `[explore]` table of the cell's scenario (its defaults when it has none)."""
    for s in scenarios:
        if s.path == cell.scenario_path and s.name == cell.scenario:
            return s.explore or ExploreSpec()
    return ExploreSpec()


class ExploreDoc:
    """DIR/explore.json: written as it goes, atomically, at most every `interval` seconds."""

    def __init__(self, out: Path, command: str, interval: float = 1.0) -> None:
        self.out = Path(out)
        self.path = self.out / DOC_NAME
        self.interval = interval
        self.command = command
        self.started = utc_now()
        self._lock = threading.RLock()
        self._saved = 0.0
        self._sources: list[CellSource] = []
        self._finished: str | None = None
        self._complete = False
        self._interrupted = False
        self._ok: bool | None = None

    def add_cell(self, cell: CellSource) -> None:
        """A cell's record, or a callable that gives its record as it stands (a running cell)."""
        with self._lock:
            self._sources.append(cell)
        self.save(force=True)

    @property
    def cells(self) -> list[CellRecord]:
        """Every cell's record as it stands now."""
        with self._lock:
            sources = list(self._sources)
        return [s if isinstance(s, CellRecord) else s() for s in sources]

    def document(self) -> ExploreDocument:
        """The whole file as it stands now, with the cells' totals."""
        cells = tuple(self.cells)
        return ExploreDocument(
            command=self.command,
            started=self.started,
            finished=self._finished,
            complete=self._complete,
            interrupted=self._interrupted,
            ok=self._ok,
            counts=Counts.total(c.counts for c in cells),
            cells=cells,
        )

    def changed(self) -> None:
        if time.monotonic() - self._saved >= self.interval:
            self.save(force=True)

    def save(self, force: bool = False) -> Path:
        with self._lock:
            if not force and time.monotonic() - self._saved < self.interval:
                return self.path
            text = self.document().text()
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            self._saved = time.monotonic()
        return self.path

    def finish(self, *, interrupted: bool = False) -> ExploreDocument:
        """Judge the whole run (every cell passed), write the file a last time, and return it."""
        with self._lock:
            cells = self.cells
            self._finished = utc_now()
            self._interrupted = interrupted
            done = all(c.status in (CellStatus.DONE, CellStatus.SKIPPED) for c in cells)
            self._complete = not interrupted and done
            judged = [c for c in cells if c.status is not CellStatus.SKIPPED]
            self._ok = (
                not interrupted and bool(judged) and all(c.verdict is Verdict.PASS for c in judged)
            )
            self.save(force=True)
            return self.document()
