"""The runner without guests: -j N workers, results after every cell, Ctrl-C, a killed run.

The cells are fakes (`fake_cells`): they boot nothing but run in the same
worker processes, through the same recorder, as real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.crash.images import CellImages
from harness.crash.plan import make_plan
from harness.crash.runner import KeepImages, RunObserver, prune_images, run_plan
from harness.durability.contract import CacheMode
from harness.errors import ConfigError
from harness.report.results import CellResult, load_results
from harness.scenario.cells import Cell
from harness.vm.spec import Accel

from . import fake_cells

ROOT = Path(__file__).parents[3]
UNIT = ROOT / "tests" / "unit"
MATRIX = ROOT / "scenarios" / "matrix.toml"


class Events(RunObserver):
    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.phases: list[tuple[int, str]] = []

    def cell_started(self, index: int, cell: Cell) -> None:
        self.log.append(("started", index))

    def phase(self, index: int, cell: Cell, phase: str) -> None:
        self.phases.append((index, phase))

    def cell_finished(self, index: int, cell: Cell, result: CellResult) -> None:
        self.log.append(("finished", index))


def run(tmp_path: Path, *argv: str, jobs: int, cell_run: object, **kw: object) -> object:
    plan = make_plan([str(MATRIX)], tmp_path / "out", accel=Accel.TCG, **kw)  # type: ignore[arg-type]
    events = Events()
    outcome = run_plan(
        plan,
        command="pytest",
        images=CellImages(default=fake_cells.image(tmp_path)),
        observer=events,
        jobs=jobs,
        cell_run=cell_run,  # type: ignore[arg-type]
    )
    return plan, outcome, events


def test_two_workers_run_two_cells_at_once_and_the_results_keep_the_plan_order(
    tmp_path: Path,
) -> None:
    plan, outcome, events = run(
        tmp_path, jobs=2, cell_run=fake_cells.together, modes=[CacheMode.NONE]
    )
    results = outcome.results  # type: ignore[attr-defined]
    assert [c.verdict for c in results.cells] == ["pass", "pass"], [c.reason for c in results.cells]
    # Both passed `together`, which passes only while another cell runs: side by side. (The
    # events of two workers reach the observer in the order the runner reads their pipes, so
    # only each cell's own events are in order: its start before its end.)
    for i in (0, 1):
        assert events.log.index(("started", i)) < events.log.index(("finished", i))
    assert {i for i, _ in events.phases} == {0, 1}
    assert [c.id for c in results.cells] == [c.id for c in plan.cells]  # type: ignore[attr-defined]
    pids = {(tmp_path / "out" / f"started-{i}").read_text() for i in (0, 1)}
    assert len(pids) == 2 and str(os.getpid()) not in pids, "cells ran in two worker processes"
    assert outcome.ok  # type: ignore[attr-defined]


def test_one_job_runs_in_this_process_one_cell_after_another(tmp_path: Path) -> None:
    _, _outcome, events = run(tmp_path, jobs=1, cell_run=fake_cells.passing, modes=[CacheMode.NONE])
    assert events.log == [("started", 0), ("finished", 0), ("started", 1), ("finished", 1)]
    assert (tmp_path / "out" / "started-0").read_text() == str(os.getpid())


def test_more_jobs_than_cells_and_every_cell_once(tmp_path: Path) -> None:
    _, outcome, _ = run(tmp_path, jobs=8, cell_run=fake_cells.passing)
    results = outcome.results  # type: ignore[attr-defined]
    assert len(results.cells) == 10 and len({c.id for c in results.cells}) == 10
    assert not results.missing and results.complete


def test_jobs_must_be_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1, not 0"):
        run(tmp_path, jobs=0, cell_run=fake_cells.passing)


def test_keep_images_failed_keeps_only_the_failed_cells_disks(tmp_path: Path) -> None:
    plan, _outcome, _ = run(tmp_path, jobs=2, cell_run=fake_cells.passing)
    kept = sorted(p.parent.name for p in (tmp_path / "out").rglob("disk.img"))
    failed = sorted(
        plan.cell_directory(i, c).name  # type: ignore[attr-defined]
        for i, c in enumerate(plan.cells)  # type: ignore[attr-defined]
        if c.mode.value == "unsafe"
    )
    assert kept == failed and len(kept) == 2
    assert all((p.parent / "console.log").exists() for p in (tmp_path / "out").rglob("disk.img"))


def test_prune_images_by_policy(tmp_path: Path) -> None:
    for keep, verdict, gone in (
        (KeepImages.FAILED, "pass", True),
        (KeepImages.FAILED, "fail", False),
        (KeepImages.FAILED, "error", False),
        (KeepImages.ALL, "pass", False),
        (KeepImages.NONE, "fail", True),
    ):
        (tmp_path / "disk.img").write_bytes(b"x")
        (tmp_path / "writes.log").write_bytes(b"x")
        prune_images(tmp_path, verdict, keep)
        assert (tmp_path / "disk.img").exists() != gone, (keep, verdict)
        assert (tmp_path / "writes.log").exists()


def _default_sigint() -> None:
    # What a terminal gives a foreground job; a background job of a script ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _subprocess_run(out: Path, jobs: int, function: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(UNIT)}
    return subprocess.Popen(
        [sys.executable, "-m", "crash.fake_cells", str(MATRIX), str(out), str(jobs), function],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait(condition: object, proc: subprocess.Popen[str], what: str) -> None:
    end = time.monotonic() + 120
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0]}"
        assert time.monotonic() < end, f"no {what} within 120 s"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: only its parent can reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_every_running_cell_and_marks_the_rest_skipped(
    tmp_path: Path, jobs: int
) -> None:
    out = tmp_path / "out"
    proc = _subprocess_run(out, jobs, "until_interrupted")
    try:
        _wait(lambda: len(list(out.glob("started-*"))) == jobs, proc, "the cells started")
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert len(list(out.glob("cleaned-*"))) == jobs, "a running cell did not clean up"
    results = load_results(out)
    assert results.complete and len(results.cells) == 10
    assert {c.verdict for c in results.cells} == {"skipped"}
    workers = [int(p.read_text()) for p in out.glob("started-*")]
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived the run"


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_killed_after_two_cells_keeps_their_results_and_names_the_rest(
    tmp_path: Path, jobs: int
) -> None:
    out = tmp_path / "out"
    proc = _subprocess_run(out, jobs, "killer")
    try:
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, output
    results = load_results(out)
    assert not results.complete and len(results.planned_keys) == 10
    ran = {c.id for c in results.cells}
    assert len(ran) >= 2 and len(results.missing) == 10 - len(ran)
    assert results.cells[0].verdict == "pass"
    # JUnit too: every planned cell is a test case; those that never ran are skipped. The two
    # files are written one after the other, so the kill may fall between them: junit.xml may
    # lag results.json by the one cell recorded last, never more, and is whole on its own.
    junit = (out / "junit.xml").read_text()
    never_ran = junit.count("never ran")
    assert junit.count("<testcase") == 10
    assert never_ran in (len(results.missing), len(results.missing) + 1), junit
    assert junit.count("<testcase") - never_ran >= 2
    # A worker must not outlive the run it worked for.
    workers = [int(p.read_text()) for p in out.glob("started-*")]
    end = time.monotonic() + 30
    while [pid for pid in workers if _alive(pid) and pid != proc.pid]:
        assert time.monotonic() < end, "a worker outlived the killed run"
        time.sleep(0.05)
    # `powercut report DIR` renders the partial run and names the cells that never ran.
    report = subprocess.run(
        [sys.executable, "-m", "harness.cli", "report", str(out), "--strict"],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 1, report.stdout + report.stderr
    assert "never ran" in report.stdout
    missing = results.missing[0].id
    assert missing in report.stdout.replace("\n", "")
    markdown = (out / "report.md").read_text()
    assert "## Never ran" in markdown and missing in markdown and "Partial" in markdown
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is False and len(data["planned"]) == 10
