"""Run one cell: boot, workload, cut, recover, check, judge.

The choreography lives here and nothing else: the session boots, cuts and
runs the oracle (`harness.crash.session`), the workload runs and checks
itself (`harness.workloads`, through the `Workload` interface), the verdict
judges (`harness.crash.verdict`) and the record keeps (`harness.crash.record`).
The session is anything with `CellSession`'s methods, so a unit test can run a
cell's whole sequence on a fake machine.

Two sequences:

* a power cut (guest or host): boot, start the workload, wait for the cut
  moment (or for the workload to cut itself), cut, run the oracle on the
  image as the cut left it, reboot, mount, check;
* a backend crash: boot, start, wait, crash and restart the backend under
  the running guest, let the workload go on, check in the same boot (the
  guest kept its own cache, so everything must be there) and run the oracle
  after a clean shutdown — never after killing QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.crash.explain import explain_cell
from harness.crash.qemu_session import session_for
from harness.crash.record import cell_result, error_result
from harness.crash.session import PowerCut
from harness.crash.tracer import RunTracer
from harness.crash.verdict import Observed, OracleObservation, expected_for_cell, judge
from harness.durability.contract import CutPolicy, FaultModel, Promise
from harness.durability.oracle import OracleReport
from harness.errors import ConfigError, GuestError, PowercutError, TimeoutExpired
from harness.explore.causes import Explanation
from harness.explore.fileview import FileView
from harness.explore.traced import TRACE_FILE, TRACE_TEXT, TracedRun
from harness.guest.fileview import file_view
from harness.guest.kernel_log import count_io_errors
from harness.guest.ssh import SSHSession
from harness.report.results import CellResult
from harness.scenario.cells import Cell
from harness.scenario.model import TriggerKind
from harness.vm.image import GuestImage
from harness.vm.spec import Accel
from harness.workloads import filesystem
from harness.workloads.base import (
    FSCK,
    MOUNT,
    ORACLE,
    POLL,
    Observation,
    Run,
    settle_with_device_log,
)
from harness.workloads.stream import AckClock, GuestStream

log = logging.getLogger(__name__)


class CellSession(Protocol):
    """What a cell needs of its machine and disk (`CrashSession` and `QemuSession` are real)."""

    def __enter__(self) -> CellSession: ...

    def __exit__(self, *exc: object) -> None: ...

    def boot(self, timeout: float = ...) -> SSHSession: ...

    @property
    def ssh(self) -> SSHSession: ...

    def host_port(self, guest_port: int) -> int: ...

    @property
    def fio_server_port(self) -> int | None: ...

    def requests(self, kind: str) -> int: ...

    def freeze_disk(self) -> None: ...

    def power_cut(
        self, fault: FaultModel, policy: CutPolicy, seed: int = 0, *, check: bool = True
    ) -> PowerCut: ...

    def reboot(self, timeout: float = ...) -> SSHSession: ...

    def crash_backend(self, timeout: float = ...) -> float: ...

    def shutdown(self) -> None: ...

    def power_off(self) -> None: ...

    def check_oracle(self, contract: Promise) -> OracleReport: ...

    def artifacts(self) -> dict[str, Path]: ...


# (directory, image, mode, the cell's DiskSpec, *, accel=, name=) -> a session.
SessionFactory = Callable[..., CellSession]


@dataclass
class Timer:
    """Phase timings of a cell (seconds), in the order they ran."""

    phases: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.monotonic() - t, 3)

    def total(self) -> dict[str, float]:
        return {**self.phases, "total": round(time.monotonic() - self._t0, 3)}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(1.0, self.end - time.monotonic())
        return min(left, cap) if cap is not None else left

    def check(self, what: str) -> None:
        if time.monotonic() > self.end:
            raise TimeoutExpired(
                f"the cell took longer than its timeout of {self.seconds:.0f}s ({what})"
            )


class _Guest:
    """The `GuestContext` a workload sees: the session's guest, the cell's directory and time."""

    def __init__(self, session: CellSession, directory: Path, deadline: Deadline) -> None:
        self._session = session
        self._directory = directory
        self._deadline = deadline
        self.tracer: RunTracer | None = None

    @property
    def ssh(self) -> SSHSession:
        return self._session.ssh

    @property
    def directory(self) -> Path:
        return self._directory

    def host_port(self, guest_port: int) -> int:
        return self._session.host_port(guest_port)

    @property
    def fio_server_port(self) -> int | None:
        return self._session.fio_server_port

    def time_left(self, cap: float | None = None) -> float:
        return self._deadline.left(cap)

    def check_deadline(self, what: str) -> None:
        self._deadline.check(what)

    def traced(self, command: str) -> str:
        return command if self.tracer is None else self.tracer.wrap(self.ssh, command)


class CellRunner:
    """Runs one cell in its directory and returns its `CellResult`."""

    def __init__(
        self,
        cell: Cell,
        directory: Path,
        image: GuestImage,
        *,
        accel: Accel | None,
        out: Path,
        reproduce: str,
        on_phase: Callable[[str], None] | None = None,
        session_factory: SessionFactory | None = None,
        trace: bool = True,
    ) -> None:
        self.cell = cell
        # Absolute: fio's client and the backend run in other working directories.
        self.directory = Path(directory).resolve()
        self.image = image
        self.accel = accel
        self.out = Path(out).resolve()
        self.reproduce = reproduce
        self.on_phase = on_phase or (lambda _p: None)
        # The cell's backend picks the session: powercut's stack, or QEMU's own on its disk.
        self.session_factory = session_factory or session_for(cell)
        self.timer = Timer()
        self.deadline = Deadline(cell.timeout)
        self.expected = expected_for_cell(cell)
        self.workload = cell.workload.workload
        self.notes: dict[str, object] = {}
        # Trace a command workload's run (its `trace` field) under a power cut: the
        # explanation of what it lost (`harness.crash.explain`). `trace=False` turns it off.
        self.trace = trace
        self.tracer: RunTracer | None = None
        self.ack_clock: AckClock | None = None
        self.traced_run: TracedRun | None = None

    # -- the cell --------------------------------------------------------------------

    def run(self) -> CellResult:
        cell = self.cell
        # The cell's directory is its own: a rerun into the same --out starts afresh.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        session: CellSession | None = None
        try:
            self._validate()
            with self.timer.phase("prepare"):
                session = self.session_factory(
                    self.directory, self.image, cell.mode, cell.disk, accel=self.accel, name="cell"
                )
            with session:
                observed = self._run_in(session)
            timings = self.timer.total()
            if isinstance(reconnect := self.notes.get("reconnect_seconds"), float):
                timings["reconnect"] = round(reconnect, 3)
            if isinstance(ran := self.notes.get("run_seconds"), float):
                timings["run"] = round(ran, 3)
            if self.tracer is not None:
                for phase, seconds in self.tracer.seconds.items():
                    timings[f"trace_{phase}"] = seconds
            result = cell_result(
                cell,
                judge(self.expected, observed),
                observed,
                timings=timings,
                artifacts=self._artifacts(session),
                reproduce=self.reproduce,
            )
            if self.notes.get("early_end"):
                note = "; note: the workload ended by itself before the cut moment"
                result = dataclasses.replace(result, reason=result.reason + note)
            if self.traced_run is not None:
                causes = self.notes.get("causes")
                result = dataclasses.replace(
                    result,
                    trace=self.traced_run.summary(),
                    causes=causes if isinstance(causes, Explanation) else None,
                )
        except PowercutError as exc:
            log.warning("cell %s: %s", cell.id, exc)
            result = error_result(
                cell,
                f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                timings=self.timer.total(),
                artifacts=self._artifacts(session) if session else {},
                reproduce=self.reproduce,
            )
        return result

    def _validate(self) -> None:
        """What the scenario schema allows but this workload cannot do, refused before booting."""
        refusal = self.workload.refuse(timed_cut=self.cell.cut.kind.timed, fault=self.cell.fault)
        if refusal:
            raise ConfigError(refusal)

    def _artifacts(self, session: CellSession) -> dict[str, str]:
        files = session.artifacts()
        for name in ("acks.txt", "fio", "checks.log", TRACE_FILE, TRACE_TEXT):
            path = self.directory / name
            if path.exists():
                files[name.replace(".", "_")] = path
        out = self.out.resolve()
        return {
            k: str(p.resolve().relative_to(out)) if p.resolve().is_relative_to(out) else str(p)
            for k, p in files.items()
        }

    def _run_in(self, session: CellSession) -> Observed:
        self.on_phase("boot")
        with self.timer.phase("boot"):
            session.boot(self.deadline.left(180))
        guest = _Guest(session, self.directory, self.deadline)
        if self.cell.fault is FaultModel.BACKEND_CRASH:
            return self._backend_crash(session, guest)
        return self._power_cut(session, guest)

    # -- a power cut -------------------------------------------------------------------

    def _power_cut(self, session: CellSession, guest: _Guest) -> Observed:
        cell = self.cell
        self.on_phase("workload")
        with self.timer.phase("workload"):
            run = self._start(session, guest)
            if run.cuts_itself:
                run.wait_until_cut(guest, cell.cut_at)
            else:
                self._wait_for_cut(session, run)
            if failure := run.failure():
                raise GuestError(f"the workload failed before the cut: {failure}")
        host_cut = cell.fault is FaultModel.HOST_POWER_CUT
        self._run_ended(guest, run, freeze=session.freeze_disk if host_cut else None)
        self.on_phase("cut")
        cut_ns = time.monotonic_ns()
        with self.timer.phase("cut"):
            cut = session.power_cut(
                cell.fault,
                cell.policy or CutPolicy.LOSE_ALL,
                cell.policy_seed or 0,
                check=ORACLE in cell.checkers,
            )
        run.after_cut(30)
        self._traced(run)
        if cut.cut is not None:
            self.notes["cut"] = cut.cut.summary()
        observations: dict[str, Observation] = {}
        if cut.oracle is not None:
            observations[ORACLE] = OracleObservation.from_report(cut.oracle)
        observations.update(cut.checks)  # host-side checkers on the image the cut left
        self.on_phase("reboot")
        with self.timer.phase("reboot"):
            session.reboot(self.deadline.left(180))
        self.on_phase("check")
        with self.timer.phase("check"):
            mounted = self._mount(guest) if self.cell.disk.filesystem is not None else True
            recovered = self._recovered_view(guest) if mounted else None
            observations.update(self._check(guest, run, mounted))
            observations = settle_with_device_log(observations, cut.write_log)
        if self.traced_run is not None:
            with self.timer.phase("explain"):
                found = explain_cell(
                    self.traced_run,
                    observations.get(self.workload.checker),
                    recovered,
                    cut.cut,
                    cut_ns,
                )
            if found is not None:
                self.notes["causes"] = found
        with contextlib.suppress(PowercutError, OSError):
            session.power_off()
        return Observed.of(observations)

    def _start(self, session: CellSession, guest: _Guest) -> Run:
        cell = self.cell
        disk = cell.disk
        if disk.filesystem is not None:
            if not self._mount(guest):
                options = f" -o {disk.mount_options}" if disk.mount_options else ""
                raise GuestError(
                    f"could not mount the fresh {disk.filesystem} on {filesystem.DEVICE}"
                    f"{options}; see checks.log (what the mount said) and the console log in "
                    f"{self.directory}"
                )
            filesystem.make_directories(guest.ssh, disk.filesystem, disk.directories)
        for guest_path, host_path in cell.guest_files:
            parent = guest_path.rsplit("/", 1)[0] or "/"
            guest.ssh.run(f"mkdir -p {shlex.quote(parent)}", timeout=60, check=True)
            guest.ssh.put(host_path, guest_path, mode=Path(host_path).stat().st_mode & 0o7777)
        pattern = self.workload.trace_pattern
        if self.trace and pattern is not None and cell.fault is not FaultModel.BACKEND_CRASH:
            self.tracer = guest.tracer = RunTracer(
                self.trace_directory,
                cell.disk.filesystem,
                ack_pattern=pattern,
            )
        run = self.workload.start(guest, cell.seed, cell.fault)
        self.ack_clock = AckClock()
        self.ack_clock.attach(run)
        return run

    @property
    def trace_directory(self) -> Path:
        """Where the traced run is kept (trace.json, trace.txt)."""
        return self.directory

    def _run_ended(self, guest: _Guest, run: Run, freeze: Callable[[], None] | None = None) -> None:
        """Before the cut: a traced workload that ended by itself has its trace read to the
        end and its tree listed (`RunTracer.run_ended`). The run phase's own time (its
        command's start to its end, traced or not) is kept as the `run` timing.

        Under a host power cut the disk is frozen first (`freeze`): the seconds the
        tracer takes must not give the filesystem's own periodic commit the chance to make
        durable what the run left unsynced (the shipped rename example, cut untraced at
        once, lost its last rename; traced, ext4's journal commit kept it 5 s later)."""
        stream = getattr(run, "stream", None)
        if isinstance(stream, GuestStream) and stream.ended is not None:
            self.notes["run_seconds"] = stream.ended - stream.started
        if self.tracer is not None and not run.alive():
            if freeze is not None:
                freeze()
            with self.timer.phase("trace"):
                self.tracer.run_ended(guest.ssh)

    def _traced(self, run: Run) -> TracedRun | None:
        """After the cut: the acknowledgements' stamps, and the traced run, kept in
        `trace_directory`."""
        stamps = self.ack_clock.finish(run) if self.ack_clock is not None else []
        if self.tracer is None:
            return None
        self.tracer.at_cut()
        self.traced_run = self.tracer.result(stamps)
        return self.traced_run

    def _recovered_view(self, guest: _Guest) -> FileView | None:
        """The workload's tree as the filesystem recovered it, before its check reads it."""
        fs = self.cell.disk.filesystem
        if self.traced_run is None or not self.traced_run.traced or fs is None:
            return None
        try:
            with self.timer.phase("explain"):
                return file_view(guest.ssh, MOUNT, fs, sync=False)
        except PowercutError as exc:
            self.notes["recovered_view"] = str(exc)
            return None

    def _mount(self, guest: _Guest) -> bool:
        disk = self.cell.disk
        assert disk.filesystem is not None  # only a cell with a filesystem mounts one
        with open(self.directory / "checks.log", "a") as out:
            return filesystem.mount(guest.ssh, disk.filesystem, disk.mount_options, out)

    def _wait_for_cut(self, session: CellSession, run: Run) -> None:
        """Block until the cell's cut moment (or the workload ended by itself)."""
        cell = self.cell
        trigger = cell.cut.kind
        counts_acks = self.workload.counts_acknowledgements
        base_writes = (
            session.requests("OUT")
            if trigger is TriggerKind.AFTER_ACKED_WRITES and not counts_acks
            else 0
        )
        base_flushes = session.requests("FLUSH") if trigger is TriggerKind.AFTER_FLUSHES else 0
        while True:
            self._waiting(session, run)
            if trigger is TriggerKind.AFTER_EXIT:
                if not run.alive():
                    return
            elif trigger.timed:
                if time.monotonic() - run.started >= cell.cut_at:
                    return
            elif trigger is TriggerKind.AFTER_ACKED_WRITES:
                count = run.acked() if counts_acks else session.requests("OUT") - base_writes
                if count >= cell.cut_at:
                    return
            elif session.requests("FLUSH") - base_flushes >= cell.cut_at:
                return
            if not run.alive() and trigger is not TriggerKind.AFTER_EXIT:
                log.warning("cell %s: the workload ended before the cut moment", cell.id)
                self.notes["early_end"] = True
                return
            self.deadline.check(f"waiting for the cut ({cell.cut.label})")
            time.sleep(POLL)

    def _waiting(self, session: CellSession, run: Run) -> None:
        """Called at every poll while waiting for the cut moment (a recording shows progress)."""

    def _check(self, guest: _Guest, run: Run, mounted: bool) -> dict[str, Observation]:
        """The workload's own checker (when its filesystem mounted), then the filesystem's."""
        cell = self.cell
        observations: dict[str, Observation] = {}
        own = self.workload.checker
        if own in cell.checkers and mounted:
            observations[own] = self.workload.check(guest, cell.seed, run)
        fs = cell.disk.filesystem
        if FSCK in cell.checkers and fs is not None:  # a workload needing none has no fsck
            with open(self.directory / "checks.log", "a") as out:
                observations[FSCK] = filesystem.fsck(guest.ssh, mounted, out, fs)
        return observations

    # -- a backend crash -------------------------------------------------------------------

    def _backend_crash(self, session: CellSession, guest: _Guest) -> Observed:
        self.on_phase("workload")
        with self.timer.phase("workload"):
            run = self._start(session, guest)
            self._wait_for_cut(session, run)
        self.on_phase("crash")
        with self.timer.phase("crash"):
            acked_at_crash = run.acked()
            self.notes["reconnect_seconds"] = session.crash_backend(self.deadline.left(60))
        with self.timer.phase("workload"):
            run.after_backend_crash(guest, acked_at_crash)
        self._traced(run)  # never traced under a backend crash: the acks' stamps end here
        self.on_phase("check")
        with self.timer.phase("check"):
            io_errors = count_io_errors(guest.ssh.check_output("dmesg", timeout=60), "vda")
            # Same boot: the guest kept everything it wrote, so all of it must be there.
            observations = self._check(guest, run, mounted=True)  # still mounted, if any
            session.shutdown()
            if ORACLE in self.cell.checkers:
                report = session.check_oracle(self.expected.reference)
                observations[ORACLE] = OracleObservation.from_report(report)
        return Observed.of(observations, guest_io_errors=io_errors)
