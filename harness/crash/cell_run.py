"""Run one cell: boot, workload, cut, recover, check, judge.

The order is the one in `harness.crash.plan`'s docstring; the pieces are
the other modules' (session: backend + machine + cut + oracle; workloads:
command lines and parsers; verdict: the judgement; report.results: the
record). What lives here is the choreography and the timing of the cut.

A backend crash is checked in the same boot (and the oracle after a clean
shutdown), never after killing QEMU: the guest kept its own cache, so
everything must be there (verdict.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from harness.crash.matrix import Cell
from harness.crash.scenario import (
    AckRecordsSpec,
    Checker,
    FaultModel,
    FioVerifySpec,
    FsMetaSpec,
    TriggerKind,
    WorkloadKind,
)
from harness.crash.session import CrashSession
from harness.crash.verdict import (
    FsckObservation,
    Observed,
    OracleObservation,
    expected_for_cell,
    judge,
)
from harness.crash.workloads import ackrecords, fsmeta
from harness.crash.workloads import fio as fio_workload
from harness.crash.workloads.guestlog import count_io_errors
from harness.crash.workloads.stream import AckStream
from harness.errors import ConfigError, GuestError, PowercutError, TimeoutExpired
from harness.guest.fio import ClientRun, FioClient, FioJob, run_fio, start_fio_server
from harness.guest.ssh import SSHSession
from harness.report.results import CellResult, cell_result, error_result
from harness.vm.image import GuestImage
from harness.vm.machine import HOST
from harness.vm.spec import Accel

log = logging.getLogger(__name__)

MOUNT = "/mnt"
RECORDS = f"{MOUNT}/records"
FSMETA_DIR = "fsmeta"
DEVICE = "/dev/vda"
POLL = 0.02


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


class GuestStream:
    """A guest command in a thread; every acknowledgement line it prints is counted.

    Runs on its own SSH channel so the cut can come at any moment: the
    command ends when its connection dies with the guest.
    """

    def __init__(self, ssh: SSHSession, command: str, name: str, ack_file: Path) -> None:
        self.ssh = ssh
        self.command = command
        self.stream = AckStream(name)
        self.ack_file = ack_file
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self.stderr = ""
        self.started = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"guest-{name}", daemon=True)

    def start(self) -> GuestStream:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with open(self.ack_file, "a", buffering=1) as acks:

                def line(text: str) -> None:
                    with self._lock:
                        self.stream.feed(text + "\n")
                    acks.write(text + "\n")

                result = self.ssh.run(self.command, timeout=3600, on_stdout=line)
            self.exit_code = result.exit_code
            self.stderr = result.stderr
        except (PowercutError, OSError, EOFError) as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - paramiko raises its own kinds when the guest dies
            self.error = exc

    @property
    def acked(self) -> int:
        with self._lock:
            return self.stream.highest

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def failure(self) -> str | None:
        """Why the workload itself failed (not because the power was cut)."""
        if isinstance(self.error, GuestError):
            return str(self.error)
        if self.exit_code not in (None, 0, -1):
            return f"{self.command!r} exited {self.exit_code}: {self.stderr.strip()[-300:]}"
        return None


class FioWrite:
    """The fio write phase through the host client, in a thread; the trigger saves verify state."""

    def __init__(self, client: FioClient, job: FioJob, flag: Path, timeout: float) -> None:
        self.client = client
        self.job = job
        self.flag = flag
        self.timeout = timeout
        self.run_result: ClientRun | None = None
        self.error: BaseException | None = None
        self.started = 0.0
        self._thread = threading.Thread(target=self._run, name="fio-client", daemon=True)

    def start(self, trigger_after: float, remote: str | None = None) -> FioWrite:
        self.trigger_after = max(1, round(trigger_after))
        self.remote = remote
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.run_result = self.client.run(
                [self.job],
                trigger_timeout=self.trigger_after,
                trigger=f"touch {shlex.quote(str(self.flag))}",
                trigger_remote=self.remote,
                timeout=self.timeout,
                name="write",
            )
        except (PowercutError, OSError) as exc:
            self.error = exc

    @property
    def triggered(self) -> bool:
        return self.flag.exists()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _requests(session: CrashSession, kind: str) -> int:
    try:
        return int(session.backend.stats().get("requests", {}).get(kind, 0))
    except (OSError, ValueError, PowercutError):
        return -1


class CellRunner:
    """Runs one cell in its directory and returns its `CellResult`."""

    def __init__(
        self,
        cell: Cell,
        directory: Path,
        image: GuestImage,
        *,
        accel: Accel | str | None,
        out: Path,
        reproduce: str,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.cell = cell
        # Absolute: fio's client and the backend run in other working directories.
        self.directory = Path(directory).resolve()
        self.image = image
        self.accel = accel
        self.out = Path(out).resolve()
        self.reproduce = reproduce
        self.on_phase = on_phase or (lambda _p: None)
        self.timer = Timer()
        self.deadline = Deadline(cell.timeout)
        self.expected = expected_for_cell(cell)
        self.notes: dict[str, object] = {}
        self.stream: GuestStream | None = None
        self.fio_writer: FioWrite | None = None

    # -- the cell --------------------------------------------------------------------

    def run(self) -> CellResult:
        cell = self.cell
        # The cell's directory is its own: a rerun into the same --out starts afresh.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        session: CrashSession | None = None
        try:
            self._validate()
            kind = cell.workload.kind
            needs_fs = kind in (WorkloadKind.ACK_RECORDS, WorkloadKind.EXT4_METADATA)
            with self.timer.phase("prepare"):
                session = CrashSession(
                    self.directory,
                    self.image,
                    cell.mode,
                    disk_size=cell.disk_size,
                    accel=self.accel,
                    ext4=needs_fs,
                    directories=(FSMETA_DIR,) if kind is WorkloadKind.EXT4_METADATA else (),
                    blkdebug=cell.blkdebug,
                    name="cell",
                )
            with session:
                observed = self._run_in(session)
            timings = self.timer.total()
            if isinstance(reconnect := self.notes.get("reconnect_seconds"), float):
                timings["reconnect"] = round(reconnect, 3)
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
        """What the scenario schema allows but this runner cannot do, refused before booting."""
        cell = self.cell
        timed = cell.cut.kind in (TriggerKind.AFTER_SECONDS, TriggerKind.WINDOW)
        fio = cell.workload.kind is WorkloadKind.FIO_VERIFY
        if fio and not timed and cell.fault is not FaultModel.BACKEND_CRASH:
            raise ConfigError(
                f"fio-verify cells cut by time (after-seconds or window), not "
                f"{cell.cut.kind.value}: fio saves its verify state only on its timed "
                "trigger and stops writing there; change the workload's [workload.cut]"
            )

    def _artifacts(self, session: CrashSession) -> dict[str, str]:
        files = session.artifacts()
        for name in ("acks.txt", "fio", "checks.log"):
            path = self.directory / name
            if path.exists():
                files[name.replace(".", "_")] = path
        out = self.out.resolve()
        return {
            k: str(p.resolve().relative_to(out)) if p.resolve().is_relative_to(out) else str(p)
            for k, p in files.items()
        }

    def _run_in(self, session: CrashSession) -> Observed:
        cell = self.cell
        self.on_phase("boot")
        with self.timer.phase("boot"):
            ssh = session.boot(self.deadline.left(180))
        if cell.fault is FaultModel.BACKEND_CRASH:
            return self._backend_crash(session, ssh)
        self.on_phase("workload")
        with self.timer.phase("workload"):
            self._workload_until_cut(session, ssh)
        self.on_phase("cut")
        with self.timer.phase("cut"):
            cut = session.power_cut(
                cell.fault,
                cell.policy or "lose-all",
                cell.policy_seed or 0,
                check=Checker.ORACLE in cell.checkers,
            )
        acked = 0
        if self.stream is not None:
            # Every acknowledgement the host had received when the power went is a
            # promise, also those that came in while the cut was being made.
            self.stream.join(30)
            acked = self.stream.acked
        if cut.cut is not None:
            self.notes["cut"] = cut.cut.summary()
        oracle_obs = OracleObservation.from_report(cut.oracle) if cut.oracle else None
        self.on_phase("reboot")
        with self.timer.phase("reboot"):
            ssh = session.reboot(self.deadline.left(180))
        self.on_phase("check")
        with self.timer.phase("check"):
            observed = self._check_after(session, ssh, acked)
        with contextlib.suppress(PowercutError, OSError):
            session.machine.power_cut()
        return Observed(
            oracle=oracle_obs,
            fio_verify=observed.fio_verify,
            fsck=observed.fsck,
            ack_records=observed.ack_records,
            fsmeta=observed.fsmeta,
        )

    # -- workloads -------------------------------------------------------------------

    def _mount(self, ssh: SSHSession) -> bool:
        return ssh.run(f"mkdir -p {MOUNT} && mount -t ext4 {DEVICE} {MOUNT}", timeout=120).ok

    def _start_stream(self, ssh: SSHSession) -> GuestStream:
        cell = self.cell
        params = cell.workload.params
        if not self._mount(ssh):
            raise GuestError(
                f"could not mount the fresh ext4 on {DEVICE}; console log {self.directory}"
            )
        if isinstance(params, AckRecordsSpec):
            command = ackrecords.write_command(params, RECORDS, cell.seed)
        else:
            assert isinstance(params, FsMetaSpec)
            command = fsmeta.write_command(params, f"{MOUNT}/{FSMETA_DIR}", cell.seed)
        # A second SSH session for the stream: the main one stays free for stats and kills.
        return GuestStream(ssh, command, cell.workload.name, self.directory / "acks.txt").start()

    def _wait_for_cut(
        self,
        session: CrashSession,
        started: float,
        acked: Callable[[], int],
        alive: Callable[[], bool],
    ) -> None:
        """Block until the cell's cut moment (or the workload ended by itself)."""
        cell = self.cell
        trigger = cell.cut.kind
        base_writes = _requests(session, "OUT") if trigger is TriggerKind.AFTER_ACKED_WRITES else 0
        base_flushes = _requests(session, "FLUSH") if trigger is TriggerKind.AFTER_FLUSHES else 0
        while True:
            if trigger in (TriggerKind.AFTER_SECONDS, TriggerKind.WINDOW):
                if time.monotonic() - started >= cell.cut_at:
                    return
            elif trigger is TriggerKind.AFTER_ACKED_WRITES:
                count = (
                    acked()
                    if cell.workload.kind is not WorkloadKind.FIO_VERIFY
                    else (_requests(session, "OUT") - base_writes)
                )
                if count >= cell.cut_at:
                    return
            elif _requests(session, "FLUSH") - base_flushes >= cell.cut_at:
                return
            if not alive():
                log.warning("cell %s: the workload ended before the cut moment", cell.id)
                self.notes["early_end"] = True
                return
            self.deadline.check(f"waiting for the cut ({cell.cut.label})")
            time.sleep(POLL)

    def _workload_until_cut(self, session: CrashSession, ssh: SSHSession) -> None:
        """Run the workload up to the cut moment."""
        cell = self.cell
        if cell.workload.kind is WorkloadKind.FIO_VERIFY:
            self._fio_write(session, ssh)
            return
        stream = self._start_stream(ssh)
        self._wait_for_cut(session, stream.started, lambda: stream.acked, lambda: stream.alive)
        if failure := stream.failure():
            raise GuestError(f"the workload failed before the cut: {failure}")
        self.stream = stream

    def _fio_client(self, session: CrashSession, ssh: SSHSession) -> FioClient:
        port = session.machine.spec.fio_server_port
        assert port is not None
        start_fio_server(ssh, port)
        return FioClient(HOST, session.machine.host_port(port), self.directory / "fio")

    def _fio_write(self, session: CrashSession, ssh: SSHSession) -> None:
        cell = self.cell
        assert isinstance(cell.workload.params, FioVerifySpec)
        client = self._fio_client(session, ssh)
        job = fio_workload.write_job(cell.workload.params, DEVICE, cell.seed)
        flag = self.directory / "fio" / "triggered"
        flag.unlink(missing_ok=True)
        # On the trigger the server saves its verify state, stops the job (which then
        # flushes) and runs the remote trigger, which is the cut itself: sysrq-b resets
        # the guest at once (QEMU runs with -no-reboot, so it exits), racing the stopped
        # job's final flush — fio's own power-cut recipe. fio's trigger is a time only.
        writer = FioWrite(client, job, flag, self.deadline.left())
        writer.start(cell.cut_at, "echo b > /proc/sysrq-trigger")
        while not writer.triggered:
            if not writer.alive:
                detail = writer.error or (writer.run_result.log[-500:] if writer.run_result else "")
                raise GuestError(f"fio ended before its trigger fired: {detail}")
            self.deadline.check("waiting for fio's trigger")
            time.sleep(POLL)
        self.fio_writer = writer

    # -- after the reboot ----------------------------------------------------------------

    def _check_after(self, session: CrashSession, ssh: SSHSession, acked: int) -> Observed:
        cell = self.cell
        params = cell.workload.params
        checks = self.directory / "checks.log"
        if isinstance(params, FioVerifySpec):
            fio_obs = None
            if Checker.FIO_VERIFY in cell.checkers:
                if self.fio_writer is not None:
                    self.fio_writer.join(30)
                client = self._fio_client(session, ssh)
                run = client.run(
                    [fio_workload.verify_job(params, DEVICE, cell.seed)],
                    timeout=self.deadline.left(),
                    name="verify",
                )
                checks.write_text(run.log + "\n" + run.output)
                fio_obs = fio_workload.parse_verify(run.output, run.log)
                if not fio_obs.blocks_verified and not fio_obs.verify_errors:
                    raise GuestError(
                        f"fio verify read nothing (exit {run.exit_code}); see {checks}"
                    )
            return Observed(fio_verify=fio_obs)
        if self.stream is not None:
            self.stream.join(30)
        mounted = self._mount(ssh)
        ack_obs = fs_obs = None
        with open(checks, "a") as out:
            if (
                mounted
                and isinstance(params, AckRecordsSpec)
                and Checker.ACK_RECORDS in cell.checkers
            ):
                text = ssh.run(ackrecords.check_command(params, RECORDS, cell.seed), timeout=120)
                out.write(f"$ ackrecords --check\n{text.stdout}{text.stderr}\n")
                ack_obs = ackrecords.AckRecordsObservation(
                    acked, ackrecords.parse_check(text.stdout)
                )
            if mounted and isinstance(params, FsMetaSpec) and Checker.FSMETA in cell.checkers:
                command = fsmeta.check_command(params, f"{MOUNT}/{FSMETA_DIR}", cell.seed, acked)
                text = ssh.run(command, timeout=120)
                out.write(f"$ {command}\n{text.stdout}{text.stderr}\n")
                fs_obs = fsmeta.FsMetaObservation(acked, fsmeta.parse_check(text.stdout))
            fsck_obs = self._fsck(ssh, mounted, out) if Checker.FSCK in cell.checkers else None
        return Observed(fsck=fsck_obs, ack_records=ack_obs, fsmeta=fs_obs)

    def _fsck(self, ssh: SSHSession, mounted: bool, out: TextIO) -> FsckObservation:
        if mounted:
            ssh.run(f"umount {MOUNT}", timeout=120, check=True)
        result = ssh.run(f"e2fsck -fn {DEVICE}", timeout=300)
        text = result.stdout + result.stderr
        out.write(f"$ e2fsck -fn {DEVICE}  (exit {result.exit_code})\n{text}\n")
        return FsckObservation(mounted, result.exit_code, "\n".join(text.splitlines()[-10:]))

    # -- backend crash ---------------------------------------------------------------------

    def _backend_crash(self, session: CrashSession, ssh: SSHSession) -> Observed:
        cell = self.cell
        params = cell.workload.params
        self.on_phase("workload")
        if isinstance(params, FioVerifySpec):
            return self._backend_crash_fio(session, ssh, params)
        with self.timer.phase("workload"):
            stream = self._start_stream(ssh)
            self._wait_for_cut(session, stream.started, lambda: stream.acked, lambda: stream.alive)
        self.on_phase("crash")
        with self.timer.phase("crash"):
            at_crash = stream.acked
            self.notes["reconnect_seconds"] = session.crash_backend(self.deadline.left(60))
        with self.timer.phase("workload"):
            # The workload must go on after the restart: wait for more acknowledgements.
            resumed = time.monotonic()
            while stream.alive and stream.acked < at_crash + 20 and time.monotonic() - resumed < 10:
                time.sleep(POLL)
            ssh.run("killall ackrecords fsmeta 2>/dev/null; true", timeout=30)
            stream.join(self.deadline.left(60))
            failure = stream.failure()
            if failure and stream.exit_code not in (137, 143, -1):  # 137/143: killed by us
                raise GuestError(f"the workload failed across the backend crash: {failure}")
        self.stream = stream
        self.on_phase("check")
        with self.timer.phase("check"):
            io_errors = count_io_errors(ssh.check_output("dmesg", timeout=60), "vda")
            # Same boot: the guest kept everything it wrote, so all of it must be there.
            with open(self.directory / "checks.log", "a") as out:
                ack_obs = fs_obs = None
                if isinstance(params, AckRecordsSpec) and Checker.ACK_RECORDS in cell.checkers:
                    text = ssh.run(
                        ackrecords.check_command(params, RECORDS, cell.seed), timeout=120
                    )
                    out.write(f"$ ackrecords --check\n{text.stdout}{text.stderr}\n")
                    ack_obs = ackrecords.AckRecordsObservation(
                        stream.acked, ackrecords.parse_check(text.stdout)
                    )
                if isinstance(params, FsMetaSpec) and Checker.FSMETA in cell.checkers:
                    command = fsmeta.check_command(
                        params, f"{MOUNT}/{FSMETA_DIR}", cell.seed, stream.acked
                    )
                    text = ssh.run(command, timeout=120)
                    out.write(f"$ {command}\n{text.stdout}{text.stderr}\n")
                    fs_obs = fsmeta.FsMetaObservation(stream.acked, fsmeta.parse_check(text.stdout))
                fsck_obs = self._fsck(ssh, True, out) if Checker.FSCK in cell.checkers else None
            oracle_obs = self._oracle_after_shutdown(session)
        return Observed(
            oracle=oracle_obs,
            fsck=fsck_obs,
            ack_records=ack_obs,
            fsmeta=fs_obs,
            guest_io_errors=io_errors,
        )

    def _backend_crash_fio(
        self, session: CrashSession, ssh: SSHSession, params: FioVerifySpec
    ) -> Observed:
        cell = self.cell
        # One fio run in the guest writes `size` once, then verifies it (same boot).
        # Not time-based: fio skips the verify phase of a time-based job.
        options = fio_workload.write_options(params, DEVICE, cell.seed)
        options.update({"do_verify": 1, "verify_state_save": 0, "verify_fatal": 0})
        options.pop("time_based", None)
        options.pop("runtime", None)
        job = fio_workload.to_job("crash", options)
        result: dict[str, object] = {}

        def work() -> None:
            try:
                result["fio"] = run_fio(ssh, [job], timeout=self.deadline.left(), check=False)
            except (PowercutError, OSError) as exc:
                result["error"] = exc

        with self.timer.phase("workload"):
            thread = threading.Thread(target=work, name="fio-guest", daemon=True)
            started = time.monotonic()
            thread.start()
            self._wait_for_cut(session, started, lambda: 0, thread.is_alive)
        self.on_phase("crash")
        with self.timer.phase("crash"):
            self.notes["reconnect_seconds"] = session.crash_backend(self.deadline.left(60))
        with self.timer.phase("workload"):
            thread.join(self.deadline.left())
        if "error" in result:
            raise GuestError(f"fio failed across the backend crash: {result['error']}")
        fio_result = result.get("fio")
        self.on_phase("check")
        with self.timer.phase("check"):
            errors = getattr(fio_result, "errors", 0)
            jobs = getattr(fio_result, "jobs", ())
            read_bytes = sum(j.read.io_bytes for j in jobs)
            fio_obs = fio_workload.FioVerifyObservation(int(errors), read_bytes // 4096)
            if not read_bytes:
                raise GuestError("fio's verify phase read nothing: the check would prove nothing")
            io_errors = count_io_errors(ssh.check_output("dmesg", timeout=60), "vda")
            oracle_obs = self._oracle_after_shutdown(session)
        return Observed(oracle=oracle_obs, fio_verify=fio_obs, guest_io_errors=io_errors)

    def _oracle_after_shutdown(self, session: CrashSession) -> OracleObservation | None:
        session.shutdown()
        if Checker.ORACLE not in self.cell.checkers:
            return None
        return OracleObservation.from_report(session.check_oracle(self.expected.oracle_mode))
