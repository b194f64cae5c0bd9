"""Record one cell's workload for exploration: the run the crash states are made from.

The cell runs as `powercut run` would run it — the same session graph (log-writes
over [blkdebug over] powerfail over the file), the same mount, setup and
workload through `Workload.start`, the same cut moment — with three changes:

* the log keeps the data of every write (`log-data=on` on log-writes), and the
  image is copied (sparse) after mkfs and before the guest boots: the
  recording's base, so the log holds everything the guest ever wrote;
* every acknowledgement is time-stamped with the host's CLOCK_MONOTONIC as it
  arrives (`AckClock`), the clock log-writes stamps its records with, so
  `acks_from_times` places it in the log's order at or after the moment the
  guest acknowledged — never before, so a state cut at an acknowledgement
  never holds the workload to a promise it had not made yet;
* at the cut moment the backend is frozen and QEMU killed (a host power cut),
  but nothing is reverted: the end of the log is the run's last persistence
  point, and the image and journal as they stand let `runner_cuts` compute
  what the runner's own lose-all and keep-all cuts would have left, to compare
  with the explored states at that point.

Acknowledgements are stamped by wrapping the run's acknowledgement stream
(`StreamRun`, every shipped workload but fio's); a line that arrived before
the wrapper was in place is stamped when it is found, later than it arrived,
which is always safe. A run of another kind is asked `acked()` at the end
and its acknowledgements are all placed there.

`run_as_of` gives a workload's `check` the run as it stood at a point: the
acknowledgements received by then (tokens for the command workload, a count
for the others).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.block.options import format_dotted
from harness.crash.cell_run import CellRunner, _Guest
from harness.crash.explorer.progress import Phase, Progress, ProgressCallback, seconds_left
from harness.crash.session import CrashSession, fault_graph
from harness.durability.contract import CacheMode, CutPolicy, FaultModel
from harness.durability.cut import apply_cut
from harness.durability.writelog import read_log
from harness.errors import ConfigError, GuestError, PowercutError
from harness.explore.recording import (
    LOG_NAME,
    Recording,
    acks_from_times,
    fingerprint,
    snapshot_base,
    sparse_copy,
    write_recording,
)
from harness.guest.ssh import SSHSession
from harness.scenario.cells import Cell
from harness.scenario.model import DiskSpec, TriggerKind
from harness.vm.image import GuestImage
from harness.workloads.base import Run
from harness.workloads.stream import (
    Acknowledgements,
    AckStream,
    GuestStream,
    Stamping,
    StreamRun,
    TokenStream,
)

log = logging.getLogger(__name__)

RECORDING_DIR = "recording"


class RecordingSession(CrashSession):
    """A `CrashSession` whose write log keeps the data, with the base copied before boot."""

    def __init__(
        self, directory: Path, image: GuestImage, mode: CacheMode, spec: DiskSpec, **kwargs: Any
    ) -> None:
        super().__init__(directory, image, mode, spec, **kwargs)
        self.recording_dir = self.directory / RECORDING_DIR
        shutil.rmtree(self.recording_dir, ignore_errors=True)
        try:
            snapshot_base(self.disk, self.recording_dir)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        self.write_log = self.recording_dir / LOG_NAME
        graph = fault_graph(self.disk, self.journal, self.write_log, self.blkdebug_config)
        graph["log-data"] = True
        self.backend = self.serve(format_dotted(graph))

    def end(self) -> None:
        """The cut moment: freeze the backend, kill QEMU and the backend; revert nothing."""
        self.backend.freeze()
        self.machine.power_cut()
        self.backend.kill()


class RunAsOf(StreamRun):
    """The run as it stood at a persistence point: the acknowledgements received by then."""

    def __init__(self, stream: Acknowledgements, ssh: SSHSession, fault: FaultModel) -> None:
        Run.__init__(self, fault)
        self.stop_command = "true"
        self.stream = GuestStream(ssh, "", "explore", Path(os.devnull), stream)


class CountedRun(Run):
    """A run of another kind, as of a point: `acked()` acknowledgements."""

    def __init__(self, count: int, fault: FaultModel) -> None:
        super().__init__(fault)
        self.count = count

    def acked(self) -> int:
        return self.count

    def alive(self) -> bool:
        return False


@dataclass
class RecordedRun:
    """What a recording leaves besides the recording itself."""

    recording: Recording
    final_image: Path  # the disk as the cut left it, nothing reverted (attribution reads it)
    journal: Path  # its powerfail journal (the runner's cuts revert from it)
    stream_kind: str  # "tokens", "count" (AckStream or a count), "run" (not a stream)
    stream_name: str
    token_pattern: Any  # the TokenStream's regex, for run_as_of
    timings: dict[str, float]

    @property
    def tokens(self) -> list[str]:
        return [a.token for a in self.recording.acks]

    def run_as_of(self, acked: int, ssh: SSHSession) -> Run:
        """The run as of a point where `acked` acknowledgements had been received."""
        fault = FaultModel.HOST_POWER_CUT
        tokens = self.tokens[:acked]
        if self.stream_kind == "tokens":
            stream = TokenStream(self.token_pattern, self.stream_name)
            stream.tokens = list(tokens)
            return RunAsOf(stream, ssh, fault)
        if self.stream_kind == "count":
            counter = AckStream(self.stream_name)
            counter.highest = counter.lines = len(tokens)
            return RunAsOf(counter, ssh, fault)
        return CountedRun(len(tokens), fault)


def recorded_run(recording: Recording, directory: Path) -> RecordedRun:
    """A RecordedRun for a recording read back from disk (replays, reports)."""
    extra = recording.extra
    pattern = extra.get("token_pattern")
    return RecordedRun(
        recording=recording,
        final_image=directory / "disk.img",
        journal=directory / "disk.journal",
        stream_kind=str(extra.get("stream_kind", "count")),
        stream_name=str(extra.get("stream_name", "explore")),
        token_pattern=re.compile(pattern) if pattern else None,
        timings={},
    )


def unexplorable(cell: Cell) -> str | None:
    """Why a cell cannot be explored, if it cannot (known before anything boots)."""
    workload = cell.workload.workload
    if not workload.counts_acknowledgements:
        return (
            f"the {workload.kind} workload cannot be explored: exploration checks what a "
            "workload acknowledged at each point, and this one acknowledges nothing"
        )
    backend = getattr(cell.disk, "backend", None)
    if backend is not None and getattr(backend, "value", "powercut") != "powercut":
        return (
            f"backend {backend.value!r} cannot be explored: exploration records through "
            'powercut\'s own stack (backend = "powercut")'
        )
    return None


class RecordingRunner(CellRunner):
    """Runs a cell's workload once, to its cut moment, into a recording.

    `on_progress` hears the boot, then every half second while the workload
    runs the acknowledgements and writes recorded so far (and the time left
    when the cut moment says it), then the cut.
    """

    PROGRESS_EVERY = 0.5  # seconds between reports while the workload runs

    def __init__(
        self,
        cell: Cell,
        directory: Path,
        image: GuestImage,
        *,
        on_progress: ProgressCallback | None = None,
        label: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("out", directory)
        kwargs.setdefault("reproduce", "")
        super().__init__(cell, directory, image, session_factory=RecordingSession, **kwargs)
        self.on_progress = on_progress or (lambda _p: None)
        self.label = label or cell.id
        self._reported = 0.0
        self._recorded = (0, 0)  # acknowledgements, writes: as last reported

    @property
    def trace_directory(self) -> Path:
        return self.directory / RECORDING_DIR

    def _waiting(self, session: Any, run: Run) -> None:
        now = time.monotonic()
        if now - self._reported < self.PROGRESS_EVERY:
            return
        self._reported = now
        acks = run.acked()
        with contextlib.suppress(PowercutError, OSError):  # a report is worth no failure
            self._recorded = (acks, session.requests("OUT"))
        cell, elapsed = self.cell, now - run.started
        left: float | None = None
        if cell.cut.kind.timed:
            left = max(0.0, cell.cut_at - elapsed)
        elif cell.cut.kind is TriggerKind.AFTER_ACKED_WRITES:
            left = seconds_left(acks, cell.cut_at, elapsed)
        self._report(Phase.RECORD, left)

    def _report(self, phase: Phase, left: float | None = None) -> None:
        acks, writes = self._recorded
        self.on_progress(Progress(self.label, phase, acks, writes, seconds_left=left))

    def record(self) -> RecordedRun:
        cell = self.cell
        refusal = unexplorable(cell)
        if refusal:
            raise ConfigError(refusal)
        refusal = self.workload.refuse(timed_cut=cell.cut.kind.timed, fault=cell.fault)
        if refusal:
            raise ConfigError(refusal)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.timer.phase("prepare"):
            session = RecordingSession(
                self.directory, self.image, cell.mode, cell.disk, accel=self.accel, name="record"
            )
        with session:
            self._report(Phase.BOOT)
            with self.timer.phase("boot"):
                session.boot(self.deadline.left(180))
            guest = _Guest(session, self.directory, self.deadline)
            with self.timer.phase("workload"):
                run = self._start(session, guest)
                if run.cuts_itself:
                    raise ConfigError(
                        f"the {self.workload.kind} workload picks its own cut moment; "
                        "exploration needs one that streams acknowledgements"
                    )
                self._wait_for_cut(session, run)
                if failure := run.failure():
                    raise GuestError(
                        f"the workload failed before the end of the recording: {failure}"
                    )
            self._run_ended(guest, run)
            self._reported = 0.0
            self._waiting(session, run)  # the counts as they stand at the cut
            self._report(Phase.CUT)
            with self.timer.phase("cut"):
                session.end()
            run.after_cut(30)
            assert self.ack_clock is not None
            stamps = self.ack_clock.finish(run)
            self._traced(run)
        started_ns = int(run.started * 1e9)
        wlog = read_log(session.write_log)
        start_index = acks_from_times(wlog, [("start", started_ns)])[0].index
        in_flight = sum(1 for r in wlog.requests if r.complete_index is None)
        inner = run.stream.stream if isinstance(run, StreamRun) else None
        if isinstance(inner, Stamping):
            inner = inner.inner
        kind = "tokens" if isinstance(inner, TokenStream) else "count" if inner else "run"
        pattern = inner.pattern.pattern if isinstance(inner, TokenStream) else None
        recording = write_recording(
            session.recording_dir,
            mode=cell.mode,
            acks=acks_from_times(wlog, stamps),
            extra={
                "cell": cell.id,
                "scenario": cell.scenario,
                "workload": self.workload.kind,
                "filesystem": cell.disk.filesystem,
                "mount_options": cell.disk.mount_options,
                "seed": cell.seed,
                "start_index": start_index,
                "run_started_ns": started_ns,
                "in_flight_at_end": in_flight,
                "stream_kind": kind,
                "stream_name": getattr(inner, "name", self.workload.kind),
                "token_pattern": pattern,
                "trace": self.traced_run.summary() if self.traced_run is not None else None,
            },
        )
        return RecordedRun(
            recording=recording,
            final_image=session.disk,
            journal=session.journal,
            stream_kind=kind,
            stream_name=str(getattr(inner, "name", self.workload.kind)),
            token_pattern=inner.pattern if isinstance(inner, TokenStream) else None,
            timings=self.timer.total(),
        )


def runner_cuts(recorded: RecordedRun, workdir: Path) -> dict[str, str]:
    """Fingerprints of the images the runner's lose-all and keep-all cuts leave at the end."""
    out: dict[str, str] = {"keep-all": fingerprint(recorded.final_image)}
    workdir.mkdir(parents=True, exist_ok=True)
    image, journal = workdir / "lose-all.img", workdir / "lose-all.journal"
    try:
        sparse_copy(recorded.final_image, image)
        shutil.copyfile(recorded.journal, journal)
        apply_cut(image, journal, CutPolicy.LOSE_ALL, 0)
        out["lose-all"] = fingerprint(image)
    finally:
        for path in (image, journal):
            with contextlib.suppress(OSError):
                path.unlink()
    return out
