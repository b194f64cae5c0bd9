"""fio verify as a crash workload, on the raw disk: the write phase, the cut, the verify phase.

The write phase runs in the guest's fio server, driven by the host client
with a trigger, and saves its verify state when the trigger fires (fio
HOWTO, "Verification trigger"); the trigger's remote command is the cut
itself (sysrq-b resets the guest at once; QEMU runs with -no-reboot, so it
exits), racing the stopped job's final flush — fio's own power-cut recipe.
After the reboot the verify phase loads that state, so fio checks only what
it had completed before the cut. Across a backend crash one fio run in the
guest writes `size` once and verifies it in the same boot.

A scenario gives fio's own options; the ones that make this work are set
here and may not be overridden.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.durability.contract import FaultModel, Promise
from harness.durability.writelog import WriteLog, unacknowledged
from harness.errors import GuestError, PowercutError
from harness.guest.fio import (
    RW,
    ClientRun,
    FioClient,
    FioJob,
    FioResult,
    run_fio,
    start_fio_server,
)
from harness.workloads.base import (
    DEVICE,
    ORACLE,
    FieldReader,
    GuestContext,
    Observation,
    OptionValue,
    Run,
    Workload,
    wait_for,
)

HOST = "127.0.0.1"  # the guest's forwarded ports listen here
# Set by the runner (verify state and trigger); a scenario may not override them.
RESERVED = ("verify_state_save", "verify_state_load", "do_verify", "verify_only", "trigger")
# The trigger's remote command, run in the guest: the cut.
SYSRQ_RESET = "echo b > /proc/sysrq-trigger"


@dataclass(frozen=True)
class FioVerifyObservation(Observation):
    verify_errors: int  # blocks fio found with bad content (fio's verify failures)
    blocks_verified: int = 0
    io_errors: int = 0
    bad_offsets: tuple[int, ...] = ()  # byte offsets of the bad blocks fio named
    block_size: int = 4096  # the length fio's failure lines give a bad block
    # Bad blocks the disk never acknowledged, by the write log as the cut left it: the
    # newest write to some sector of the block was still in flight, or had failed. fio
    # 3.33 verifies such blocks: its verify state keeps only the last `iodepth`
    # completions and takes every write issued before them as done, though one may stall
    # behind them (fio issue #1950, fixed after 3.33), and it verifies failed writes too.
    # No cache mode promises them, so they are no loss.
    unacknowledged: tuple[int, ...] = ()

    @property
    def lost_blocks(self) -> int:
        """Bad blocks that count: those fio named that the disk acknowledged, and any fio
        counted without naming (nothing can excuse those)."""
        return max(0, self.verify_errors - len(self.unacknowledged))

    @property
    def loss(self) -> bool:
        return self.lost_blocks > 0

    def against_device_log(self, wlog: WriteLog) -> FioVerifyObservation:
        spans = [(offset, self.block_size) for offset in self.bad_offsets]
        never = unacknowledged(wlog, spans)
        return replace(self, unacknowledged=tuple(sorted(o for o, _ in never)))

    def summary(self) -> str:
        excused = ""
        if self.unacknowledged:
            excused = (
                f"; fio also named {len(self.unacknowledged)} blocks the disk never "
                "acknowledged (their newest write in flight or failed at the cut), which no "
                "contract keeps"
            )
        if not self.loss:
            return "fio verify found every completed block" + excused
        what = f"fio verify found {self.lost_blocks} bad blocks"
        if self.blocks_verified:
            what += f" of {self.blocks_verified}"
        counted = sorted(set(self.bad_offsets) - set(self.unacknowledged))
        if counted:
            what += f" (first at offset {counted[0]})"
        return what + excused


@dataclass(frozen=True)
class FioVerify(Workload):
    """`kind = "fio-verify"`: a `[workload.fio]` table of fio's own options."""

    options: tuple[tuple[str, OptionValue], ...] = ()

    kind = "fio-verify"
    checker = "fio-verify"
    checkers = (ORACLE, "fio-verify")
    needs_filesystem = False
    counts_acknowledgements = False  # an after-acked-writes cut counts the device's writes

    @classmethod
    def parse(cls, fields: FieldReader) -> FioVerify:
        reason = "is set by the runner (verify state and trigger); remove it"
        return cls(fields.options("fio", reserved=RESERVED, reason=reason))

    def as_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    @property
    def syncs_every_write(self) -> bool:
        """True when every completed fio write is also stable (so the contract covers it)."""
        opts = self.as_dict()
        for key in ("fsync", "fdatasync"):
            if str(opts.get(key, "0")) == "1":
                return True
        return str(opts.get("sync", "0")) in ("1", "sync", "dsync")

    def refuse(self, *, timed_cut: bool, fault: FaultModel) -> str | None:
        if timed_cut or fault is FaultModel.BACKEND_CRASH:
            return None
        return (
            "fio-verify cells cut by time (after-seconds or window), not by a count: fio saves "
            "its verify state only on its timed trigger and stops writing there; change the "
            "workload's [workload.cut]"
        )

    def keeps_acknowledged(self, promise: Promise) -> bool:
        opts = {**DEFAULTS, **self.as_dict()}
        reaches_device = str(opts.get("direct", 0)) == "1" or self.syncs_every_write
        if promise is Promise.EVERY_COMPLETED:
            return reaches_device
        if promise is Promise.FLUSHED:
            return self.syncs_every_write
        return False

    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        if fault is FaultModel.BACKEND_CRASH:
            return _FioInGuest(ctx, self, seed, fault)
        return _FioTriggered(ctx, self, seed, fault)

    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        if isinstance(run, _FioInGuest):
            return run.observation()
        assert isinstance(run, _FioTriggered)
        run.writer.join(30)
        client = _client(ctx)
        verify = client.run(
            [verify_job(self, DEVICE, seed)], timeout=ctx.time_left(), name="verify"
        )
        checks = ctx.directory / "checks.log"
        checks.write_text(verify.log + "\n" + verify.output)
        observation = parse_verify(verify.output, verify.log)
        if not observation.blocks_verified and not observation.verify_errors:
            raise GuestError(f"fio verify read nothing (exit {verify.exit_code}); see {checks}")
        return observation


def _client(ctx: GuestContext) -> FioClient:
    port = ctx.fio_server_port
    if port is None:
        raise GuestError("the guest image runs no fio server (no fio_server_port)")
    start_fio_server(ctx.ssh, port)
    return FioClient(HOST, ctx.host_port(port), ctx.directory / "fio")


class _FioTriggered(Run):
    """The write phase through the host client; fio's trigger saves the state and cuts."""

    def __init__(self, ctx: GuestContext, workload: FioVerify, seed: int, fault: FaultModel):
        super().__init__(fault)
        self.cut_after = 0.0
        client = _client(ctx)
        flag = ctx.directory / "fio" / "triggered"
        flag.unlink(missing_ok=True)
        self.writer = FioWrite(client, write_job(workload, DEVICE, seed), flag, ctx.time_left())

    @property
    def cuts_itself(self) -> bool:
        return True

    def acked(self) -> int:
        return 0

    def alive(self) -> bool:
        return self.writer.alive

    def wait_until_cut(self, ctx: GuestContext, seconds: float) -> None:
        # On the trigger the server saves its verify state, stops the job and runs the
        # remote trigger, which is the cut itself. fio's trigger is a time only.
        self.writer.start(seconds, SYSRQ_RESET)
        self.started = self.writer.started

        def fired() -> bool:
            if self.writer.triggered:
                return True
            if not self.writer.alive:
                result = self.writer.run_result
                detail = self.writer.error or (result.log[-500:] if result else "")
                raise GuestError(f"fio ended before its trigger fired: {detail}")
            return False

        wait_for(fired, ctx, "waiting for fio's trigger")


class _FioInGuest(Run):
    """Across a backend crash: one fio run in the guest that writes `size` once, then verifies."""

    def __init__(self, ctx: GuestContext, workload: FioVerify, seed: int, fault: FaultModel):
        super().__init__(fault)
        # Not time-based: fio skips the verify phase of a time-based job.
        options = write_options(workload, DEVICE, seed)
        options.update({"do_verify": 1, "verify_state_save": 0, "verify_fatal": 0})
        options.pop("time_based", None)
        options.pop("runtime", None)
        job = to_job("crash", options)
        self.result: FioResult | None = None
        self.error: BaseException | None = None
        timeout = ctx.time_left()

        def work() -> None:
            try:
                self.result = run_fio(ctx.ssh, [job], timeout=timeout, check=False)
            except (PowercutError, OSError) as exc:
                self.error = exc

        self._thread = threading.Thread(target=work, name="fio-guest", daemon=True)
        self._thread.start()

    def acked(self) -> int:
        return 0

    def alive(self) -> bool:
        return self._thread.is_alive()

    def after_backend_crash(self, ctx: GuestContext, acked_at_crash: int) -> None:
        self._thread.join(ctx.time_left())
        if self.error is not None:
            raise GuestError(f"fio failed across the backend crash: {self.error}")

    def observation(self) -> FioVerifyObservation:
        jobs = self.result.jobs if self.result is not None else ()
        errors = self.result.errors if self.result is not None else 0
        read_bytes = sum(j.read.io_bytes for j in jobs)
        if not read_bytes:
            raise GuestError("fio's verify phase read nothing: the check would prove nothing")
        return FioVerifyObservation(int(errors), read_bytes // 4096)


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


DEFAULTS: dict[str, OptionValue] = {
    "rw": "randwrite",
    "bs": "4k",
    "size": "32M",
    "ioengine": "libaio",
    "iodepth": 8,
    "direct": 1,
    "verify": "crc32c",
}


def write_options(spec: FioVerify, filename: str, seed: int) -> dict[str, OptionValue]:
    """The write phase: scenario options over the defaults, verify state saved on trigger."""
    options = {**DEFAULTS, **spec.as_dict()}
    options.update(
        {
            "filename": options.get("filename", filename),
            "randseed": seed,
            "do_verify": 0,
            "verify_state_save": 1,
        }
    )
    return options


def verify_options(spec: FioVerify, filename: str, seed: int) -> dict[str, OptionValue]:
    """The verify phase after the reboot: same layout and seed, verify only what was completed."""
    options = write_options(spec, filename, seed)
    for key in ("time_based", "runtime"):
        options.pop(key, None)
    options.update(
        {
            "do_verify": 1,
            "verify_only": 1,
            "verify_state_save": 0,
            "verify_state_load": 1,
            "verify_fatal": 0,
            "verify_dump": 0,
            # A verify failure is an EILSEQ I/O error that would end the job at the
            # first bad block; go on, so the count says how much was lost.
            "continue_on_error": "verify",
        }
    )
    return options


_BOOL_FIELDS = (
    "direct",
    "time_based",
    "do_verify",
    "verify_only",
    "verify_state_save",
    "verify_state_load",
    "verify_fatal",
    "randrepeat",
    "end_fsync",
)
_INT_FIELDS = ("iodepth", "numjobs", "fsync")
_STR_FIELDS = ("bs", "size", "offset", "ioengine", "verify")


def _flag(value: OptionValue) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def to_job(name: str, options: dict[str, OptionValue]) -> FioJob:
    """The options as a `harness.guest.fio.FioJob` (for `FioClient`, `run_fio`).

    Options the typed job does not name go to its `extra`.
    """
    fields: dict[str, Any] = {"name": name, "filename": str(options["filename"])}
    extra: list[tuple[str, str]] = []
    for key, value in options.items():
        if key == "filename":
            continue
        if key == "rw":
            fields["rw"] = RW(str(value))
        elif key == "runtime":
            fields["runtime"] = float(value)
        elif key in _BOOL_FIELDS:
            fields[key] = _flag(value)
        elif key in _INT_FIELDS:
            fields[key] = int(value)
        elif key in _STR_FIELDS:
            fields[key] = str(value)
        else:
            extra.append((key, str(int(value) if isinstance(value, bool) else value)))
    if "verify" in fields and "verify_fatal" not in fields:
        fields["verify_fatal"] = False
    return FioJob(**fields, extra=tuple(extra))


def write_job(spec: FioVerify, filename: str, seed: int, name: str = "crash") -> FioJob:
    return to_job(name, write_options(spec, filename, seed))


def verify_job(spec: FioVerify, filename: str, seed: int, name: str = "crash") -> FioJob:
    """Same job name as the write phase: fio finds the saved state by job name."""
    return to_job(name, verify_options(spec, filename, seed))


# fio's verify failure lines (verify.c), possibly prefixed by a client's hostname:
#   verify: bad magic header 0, wanted acca at file /dev/vda offset 8192, length 4096 ...
#   crc32c: verify failed at file /dev/vda offset 4096, length 4096 ...
_VERIFY_FAILURE = re.compile(
    r"(?:^|\s)(?:verify: bad \w+|\w+: verify failed)\b.*?\bat file \S+ offset (\d+)"
    r"(?:, length (\d+))?",
    re.MULTILINE,
)


def _jobs(data: dict[str, Any]) -> list[dict[str, Any]]:
    jobs = data.get("jobs") or data.get("client_stats") or []
    return [j for j in jobs if isinstance(j, dict) and j.get("jobname") != "All clients"]


def parse_verify(json_text: str, stderr_text: str = "") -> FioVerifyObservation:
    """The verify phase's outcome from fio's JSON output and its stderr (or combined output).

    For a `harness.guest.fio.ClientRun`: `parse_verify(run.output, run.log)`.

    With `continue_on_error=verify` fio counts every bad block in `total_err`;
    the failure lines give the offsets. Either alone is enough.
    """
    start = json_text.find("{")
    # One line per bad block (a block named twice counts once), on stderr or, from a
    # client, in its output before the JSON.
    said = stderr_text + "\n" + (json_text if start < 0 else json_text[:start])
    failures = list(_VERIFY_FAILURE.finditer(said))
    offsets = tuple(sorted({int(m.group(1)) for m in failures}))
    block = next((int(m.group(2)) for m in failures if m.group(2)), 4096)
    if start < 0:
        if offsets:
            return FioVerifyObservation(len(offsets), 0, 0, offsets, block)
        raise GuestError(f"fio printed no JSON result: {json_text[:200]!r} {stderr_text[-200:]!r}")
    try:
        data = json.JSONDecoder().raw_decode(json_text[start:])[0]
    except json.JSONDecodeError as exc:
        raise GuestError(f"fio's JSON result does not parse ({exc})") from exc
    total_err = bytes_read = 0
    for job in _jobs(data):
        total_err += int(job.get("total_err") or 0)
        bytes_read += int((job.get("read") or {}).get("io_bytes") or 0)
        if not job.get("total_err") and job.get("error") not in (0, None):
            total_err += 1  # a job that died at its first error still lost something
    bs = 4096
    errors = max(total_err, len(offsets))
    return FioVerifyObservation(errors, bytes_read // bs, 0, offsets, block)
