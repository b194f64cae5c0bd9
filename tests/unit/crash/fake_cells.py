"""Cells that boot nothing, for the runner's scheduling, persistence and interruption tests.

Module-level functions, so that the runner's spawned workers (and a run in a
subprocess) can import them. Each behaves by its cell's mode, and leaves a
`started-<index>` file (holding its pid) in the results directory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.crash.plan import make_plan
from harness.crash.record import error_result
from harness.crash.runner import CellTask, KeepImages, prune_images, run_plan
from harness.report.results import CellResult, Verdict
from harness.vm.image import GuestImage
from harness.vm.spec import Accel

DEADLINE = 120.0


def image(directory: Path) -> GuestImage:
    return GuestImage(
        directory=directory,
        recipe_hash="fake",
        kernel=directory / "vmlinux",
        bzimage=directory / "vmlinux",
        initramfs=directory / "initramfs",
        ssh_key=directory / "id",
        ssh_public_key=directory / "id.pub",
        host_public_key=directory / "host.pub",
        manifest=directory / "manifest.json",
        cmdline="console=ttyS0",
        ssh_port=22,
        fio_server_port=8765,
    )


def _start(task: CellTask, on_phase: Callable[[str], None]) -> None:
    (task.out / f"started-{task.index}").write_text(str(os.getpid()))
    on_phase("boot")
    task.directory.mkdir(parents=True, exist_ok=True)
    (task.directory / "disk.img").write_bytes(b"\0" * 4096)
    (task.directory / "console.log").write_text("fake console\n")


def _finish(task: CellTask, verdict: Verdict, reason: str) -> tuple[CellResult, bool]:
    result = error_result(
        task.cell,
        reason,
        verdict=verdict,
        timings={"total": 1.0},
        artifacts={"console_log": str(task.directory.relative_to(task.out) / "console.log")},
        reproduce=task.reproduce,
    )
    prune_images(task.directory, result.verdict, task.keep_images)
    return result, False


def _wait_for(condition: Callable[[], bool]) -> bool:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def passing(task: CellTask, on_phase: Callable[[str], None]) -> tuple[CellResult, bool]:
    """Passes; `unsafe` cells fail (to see --keep-images failed keep theirs)."""
    _start(task, on_phase)
    if task.cell.mode.value == "unsafe":
        return _finish(task, Verdict.FAIL, "fake: lost flushed data")
    return _finish(task, Verdict.PASS, "fake: kept its contract")


def together(task: CellTask, on_phase: Callable[[str], None]) -> tuple[CellResult, bool]:
    """Passes only if another cell is running at the same time (jobs >= 2)."""
    _start(task, on_phase)
    both = _wait_for(lambda: len(list(task.out.glob("started-*"))) >= 2)
    if not both:
        return _finish(task, Verdict.FAIL, "fake: ran alone")
    return _finish(task, Verdict.PASS, "fake: ran beside another cell")


def until_interrupted(task: CellTask, on_phase: Callable[[str], None]) -> tuple[CellResult, bool]:
    """Runs until Ctrl-C, then reports itself skipped as a real cell does.

    The Ctrl-C can come as soon as the started file exists, so it is caught
    from there on, as `run_cell_task` catches it around a whole real cell.
    """
    try:
        _start(task, on_phase)
        _wait_for(lambda: False)
    except KeyboardInterrupt:
        (task.out / f"cleaned-{task.index}").write_text("")
        result = error_result(
            task.cell, "interrupted", verdict=Verdict.SKIPPED, reproduce=task.reproduce
        )
        return result, True
    return _finish(task, Verdict.ERROR, "fake: never interrupted")


def _done(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["cells"])
    except (OSError, ValueError, KeyError):
        return 0


def killer(task: CellTask, on_phase: Callable[[str], None]) -> tuple[CellResult, bool]:
    """A cell that starts after two have finished SIGKILLs the run, as a CI time limit would."""
    if _done(task.out) >= 2:
        _start(task, on_phase)
        os.kill(int(os.environ["FAKE_RUN_PID"]), signal.SIGKILL)
        _wait_for(lambda: False)  # a worker dies with the run
    return passing(task, on_phase)


def main(argv: list[str]) -> int:
    """`python -m crash.fake_cells SCENARIO OUT JOBS FUNCTION`: a run in a subprocess."""
    scenario, out, jobs, function = argv
    os.environ["FAKE_RUN_PID"] = str(os.getpid())
    plan = make_plan([scenario], out, accel=Accel.TCG)
    outcome = run_plan(
        plan,
        command="fake",
        image=image(Path(out)),
        jobs=int(jobs),
        keep_images=KeepImages.FAILED,
        cell_run=globals()[function],
    )
    return 130 if outcome.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
