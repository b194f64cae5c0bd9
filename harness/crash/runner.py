"""The power-cut runner: every cell of a plan, into one results directory.

Cells are independent — each has its own directory (`RunPlan.cell_directory`),
its own backend, QEMU, free ports on 127.0.0.1 and sockets in a private
short directory — so `jobs` of them can run at once. `jobs=1` runs them one
after another in this process; `jobs>1` runs each in one of `jobs` worker
processes (spawned: a clean interpreter, each owning the QEMU and backend of
its cell, which die with it). Either way this process is the one writer of
the results: after every cell it rewrites results.json and junit.xml
atomically through `harness.report.recorder.ResultsRecorder` (pytest's
scenario items write through the same), so a run killed at a CI time limit
keeps every verdict it reached, and the plan names the cells that never
ran; the Markdown, HTML and plots come at the end.

Ctrl-C stops the cells that run (their machines and backends are killed by
their owners on the way out), marks the rest skipped, and still writes every
report. With workers, this process forwards the interrupt to them and waits
for their cells to clean up; a worker acts on the first SIGINT only, so a
terminal's Ctrl-C (which reaches the whole process group) and the forwarded
one do not interrupt the clean-up. A SIGINT the run inherited as ignored
(a background job of a non-interactive shell) stays ignored.

`keep_images` decides which cells keep their disk images (`*.img`, 256 MiB
sparse each, some tens of MB on disk): the failed ones by default; logs,
write logs and journals are always kept.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from harness.crash.cell_run import SessionFactory
from harness.crash.cluster_run import runner_for
from harness.crash.images import CellImages
from harness.crash.plan import RunPlan, expected_seconds, key
from harness.crash.record import error_result
from harness.errors import ConfigError
from harness.report.recorder import ResultsRecorder
from harness.report.render import Rendered
from harness.report.results import CellResult, RunResults, Verdict
from harness.scenario.cells import Cell
from harness.vm.accel import choose_accel
from harness.vm.image import GuestImage
from harness.vm.spec import Accel

log = logging.getLogger(__name__)


class KeepImages(enum.Enum):
    """Which cells keep their disk images after the verdict (`--keep-images`)."""

    FAILED = "failed"  # cells that failed or errored (the default)
    ALL = "all"
    NONE = "none"


def prune_images(directory: Path, verdict: str, keep: KeepImages) -> list[Path]:
    """Remove the cell's disk images unless `keep` says to keep them; returns what went."""
    failed = verdict in (Verdict.FAIL.value, Verdict.ERROR.value)
    if keep is KeepImages.ALL or (keep is KeepImages.FAILED and failed):
        return []
    removed = []
    for image in sorted(directory.glob("*.img")):
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
            removed.append(image)
    return removed


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


@dataclass(frozen=True)
class CellTask:
    """One cell to run, with everything a worker process needs (it is pickled)."""

    index: int
    cell: Cell
    directory: Path
    image: GuestImage
    accel: Accel
    out: Path
    reproduce: str
    keep_images: KeepImages = KeepImages.FAILED
    session_factory: SessionFactory | None = None  # None: the cell's backend picks (session_for)


# (task, on_phase) -> (result, interrupted); a module-level function, so workers can use it.
CellRun = Callable[[CellTask, Callable[[str], None]], tuple[CellResult, bool]]


def run_cell_task(task: CellTask, on_phase: Callable[[str], None]) -> tuple[CellResult, bool]:
    """Run one cell to its result; (result, True) when Ctrl-C stopped it."""
    runner = runner_for(
        task.cell,
        task.directory,
        task.image,
        accel=task.accel,
        out=task.out,
        reproduce=task.reproduce,
        on_phase=on_phase,
        session_factory=task.session_factory,
    )
    interrupted = False
    try:
        result = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        result = error_result(
            task.cell,
            "interrupted (Ctrl-C) while running",
            verdict=Verdict.SKIPPED,
            timings=runner.timer.total(),
            reproduce=task.reproduce,
        )
    prune_images(task.directory, result.verdict, task.keep_images)
    return result, interrupted


def _skipped(plan: RunPlan, cell: Cell) -> CellResult:
    return error_result(
        cell,
        "not run: the run was interrupted",
        verdict=Verdict.SKIPPED,
        reproduce=plan.reproduce(cell),
    )


@dataclass
class _RunState:
    """The plan's cells as they finish: into the results (`ResultsRecorder`, the one writer
    of results.json and junit.xml, the same as pytest's), then to the observer."""

    plan: RunPlan
    recorder: ResultsRecorder
    observer: RunObserver

    def record(self, index: int, result: CellResult) -> None:
        cell = self.plan.cells[index]
        log.info("cell %s: %s — %s", cell.id, result.verdict, result.reason)
        self.recorder.record(result)
        self.observer.cell_finished(index, cell, result)

    def finish(self) -> tuple[RunResults, Rendered]:
        cells = {key(c): c for c in self.plan.cells}
        return self.recorder.finish(unrun=lambda k: _skipped(self.plan, cells[k]))


def run_plan(
    plan: RunPlan,
    *,
    command: str,
    image: GuestImage | None = None,
    images: CellImages | None = None,
    observer: RunObserver | None = None,
    session_factory: SessionFactory | None = None,
    jobs: int = 1,
    keep_images: KeepImages = KeepImages.FAILED,
    cell_run: CellRun = run_cell_task,
) -> RunOutcome:
    """Run every cell of `plan`; write DIR/results.json, junit.xml, report.md/html, plots.

    `images` gives each cell its guest image (default: built as the cells ask,
    with `image` standing for the default one). `jobs` cells run at once.
    """
    if jobs < 1:
        raise ConfigError(f"-j/--jobs must be at least 1, not {jobs}")
    observer = observer or RunObserver()
    plan.out.mkdir(parents=True, exist_ok=True)
    accel: Accel | None = None
    if plan.cells:
        images = images or CellImages(default=image)
        images.prepare(plan.cells)
        accel = choose_accel(plan.accel, images(plan.cells[0]).kernel)
    recorder = ResultsRecorder(
        plan.out, command, accel=accel.value if accel else None, shard=plan.shard
    )
    # Written at once: a run killed during its first cell still names every cell.
    recorder.plan(plan.planned, plan.scenario_refs)
    run = _RunState(plan, recorder, observer)
    tasks = [
        CellTask(
            index,
            cell,
            plan.cell_directory(index, cell),
            images(cell),
            accel,
            plan.out,
            plan.reproduce(cell),
            keep_images,
            session_factory,
        )
        for index, cell in enumerate(plan.cells)
        if images is not None and accel is not None
    ]
    if jobs == 1 or len(tasks) <= 1:
        interrupted = _run_inline(tasks, run, cell_run)
    else:
        interrupted = _Pool(min(jobs, len(tasks)), cell_run, run).run(tasks)
    results, rendered = run.finish()
    return RunOutcome(results, rendered, interrupted)


def _run_inline(tasks: list[CellTask], run: _RunState, cell_run: CellRun) -> bool:
    observer = run.observer
    try:
        for task in tasks:
            observer.cell_started(task.index, task.cell)
            result, interrupted = cell_run(task, _phase_callback(observer, task.index, task.cell))
            run.record(task.index, result)
            if interrupted:
                return True
    except KeyboardInterrupt:
        return True
    return False


def _phase_callback(observer: RunObserver, index: int, cell: Cell) -> Callable[[str], None]:
    return lambda phase: observer.phase(index, cell, phase)


# -- worker processes ------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker dies with the run (and its QEMU and backend with it, by their own PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the run died before the prctl
        os._exit(1)


def _send(conn: Connection, message: Any) -> None:
    """Send whole: a SIGINT waits until the message is out (the run reads whole messages)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        conn.send(message)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _phase_sender(conn: Connection, index: int) -> Callable[[str], None]:
    return lambda phase: _send(conn, ("phase", index, phase))


def _worker(conn: Connection, cell_run: CellRun, parent: int, log_level: int) -> None:
    _die_with_parent(parent)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(processName)s %(name)s %(levelname)s: %(message)s"
    )
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        # The first SIGINT stops the cell; later ones (the terminal's and the run's
        # forwarded one) must not interrupt its clean-up.
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        while not interrupted.is_set():
            task = conn.recv()
            if task is None:
                break
            _send(conn, ("started", task.index))
            result, stopped = cell_run(task, _phase_sender(conn, task.index))
            _send(conn, ("done", task.index, result, stopped))
            if stopped:
                break
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    finally:
        conn.close()


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    task: CellTask | None = None


class _Pool:
    """`jobs` spawned workers fed one cell at a time, longest expected cell first."""

    def __init__(self, jobs: int, cell_run: CellRun, run: _RunState) -> None:
        self.jobs = jobs
        self.cell_run = cell_run
        self.state = run
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.interrupted = False
        self._wake_r, self._wake_w = os.pipe()

    def _start_worker(self) -> _Worker:
        mine, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_worker,
            args=(theirs, self.cell_run, os.getpid(), logging.getLogger().getEffectiveLevel()),
            name=f"powercut-cell-worker-{len(self.workers)}",
            daemon=False,
        )
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        self.workers.append(worker)
        return worker

    @contextlib.contextmanager
    def _sigint(self) -> Iterator[None]:
        """While the pool runs, Ctrl-C sets a flag and wakes the loop (never mid-message)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main else None
        if previous is not signal.default_int_handler:
            yield  # ignored (a background job), someone else's handler, or not the main thread
            return

        def on_sigint(signum: int, frame: Any) -> None:
            self.interrupted = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"!")

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def run(self, tasks: list[CellTask]) -> bool:
        # Longest first: the last cells to start are the short ones, so workers finish together.
        pending = [(-expected_seconds(t.cell), t.index, t) for t in tasks]
        heapq.heapify(pending)
        try:
            with self._sigint():
                for _ in range(self.jobs):
                    self._start_worker()
                self._loop(pending)
        finally:
            self._shutdown()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return self.interrupted

    def _feed(self, worker: _Worker, pending: list[tuple[float, int, CellTask]]) -> None:
        if pending and not self.interrupted:
            worker.task = heapq.heappop(pending)[2]
            worker.conn.send(worker.task)
        else:
            worker.task = None
            with contextlib.suppress(OSError):
                worker.conn.send(None)

    def _loop(self, pending: list[tuple[float, int, CellTask]]) -> None:
        observer = self.state.observer
        for worker in self.workers:
            self._feed(worker, pending)
        forwarded = False
        while any(not w.conn.closed for w in self.workers):
            if self.interrupted and not forwarded:
                forwarded = True
                for worker in self.workers:
                    if worker.process.is_alive() and worker.process.pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.process.pid, signal.SIGINT)
            conns = [w.conn for w in self.workers if not w.conn.closed]
            ready = wait([*conns, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            for worker in list(self.workers):
                if worker.conn.closed or worker.conn not in ready:
                    continue
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    self._lost(worker, pending)
                    continue
                kind, index = message[0], message[1]
                cell = self.state.plan.cells[index]
                if kind == "started":
                    observer.cell_started(index, cell)
                elif kind == "phase":
                    observer.phase(index, cell, message[2])
                elif kind == "done":
                    result, stopped = message[2], message[3]
                    self.state.record(index, result)
                    worker.task = None
                    if stopped:
                        self.interrupted = True
                    self._feed(worker, pending)

    def _lost(self, worker: _Worker, pending: list[tuple[float, int, CellTask]]) -> None:
        """A worker's pipe closed: it ended (asked to, or interrupted) or it died."""
        worker.conn.close()
        worker.process.join(30)
        task = worker.task
        if task is not None:
            code = worker.process.exitcode
            if self.interrupted:
                result = _skipped(self.state.plan, task.cell)
            else:
                result = error_result(
                    task.cell,
                    f"the worker process running this cell died (exit status {code})",
                    reproduce=task.reproduce,
                )
            self.state.record(task.index, result)
            worker.task = None
        if pending and not self.interrupted:
            self._feed(self._start_worker(), pending)

    def _shutdown(self) -> None:
        for worker in self.workers:
            if not worker.conn.closed:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
        for worker in self.workers:
            worker.process.join(120)
            if worker.process.is_alive():  # a cell that would not end: its processes die with it
                worker.process.kill()
                worker.process.join()
            if not worker.conn.closed:
                worker.conn.close()
