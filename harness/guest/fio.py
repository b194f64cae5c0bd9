"""fio: typed job descriptions, JSON results, and client/server runs.

Two ways to run a job: inside the guest over SSH (`run_fio`), or with
`fio --server` in the guest and the fio client on the host (`FioClient`),
which is fio's own way of testing power cuts: on `--trigger-timeout` the
server sends each job's write state back to the client, the client runs the
trigger command (which cuts the power), and after the reboot a verify-only
job with `verify_state_load=1` checks exactly the writes fio saw complete.
"""

from __future__ import annotations

import enum
import json
import logging
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import CommandError, ConfigError, TimeoutExpired
from harness.guest.ssh import SSHSession

log = logging.getLogger(__name__)

FIO = "fio"


class RW(enum.Enum):
    READ = "read"
    WRITE = "write"
    RANDREAD = "randread"
    RANDWRITE = "randwrite"
    RW = "rw"
    RANDRW = "randrw"
    TRIM = "trim"
    RANDTRIM = "randtrim"


@dataclass(frozen=True)
class FioJob:
    """One fio job section; fields are fio's own option names."""

    name: str
    filename: str
    rw: RW = RW.RANDWRITE
    bs: str = "4k"
    size: str | None = None
    offset: str | None = None
    iodepth: int = 1
    ioengine: str = "libaio"
    direct: bool = True
    numjobs: int = 1
    runtime: float | None = None
    time_based: bool = False
    verify: str | None = None  # "crc32c", "md5", ...; None: no verification
    do_verify: bool | None = None
    verify_only: bool = False
    verify_state_save: bool | None = None
    verify_state_load: bool = False
    verify_fatal: bool = True
    randrepeat: bool = True
    fsync: int = 0
    end_fsync: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    def options(self) -> dict[str, str]:
        def b(v: bool) -> str:
            return "1" if v else "0"

        opts: dict[str, str] = {
            "filename": self.filename,
            "rw": self.rw.value,
            "bs": self.bs,
            "iodepth": str(self.iodepth),
            "ioengine": self.ioengine,
            "direct": b(self.direct),
            "numjobs": str(self.numjobs),
            "randrepeat": b(self.randrepeat),
        }
        optional: dict[str, str | None] = {
            "size": self.size,
            "offset": self.offset,
            "runtime": None if self.runtime is None else f"{self.runtime:g}",
            "time_based": "1" if self.time_based else None,
            "verify": self.verify,
            "do_verify": None if self.do_verify is None else b(self.do_verify),
            "verify_only": "1" if self.verify_only else None,
            "verify_state_save": None
            if self.verify_state_save is None
            else b(self.verify_state_save),
            "verify_state_load": "1" if self.verify_state_load else None,
            "verify_fatal": "1" if self.verify and self.verify_fatal else None,
            "fsync": str(self.fsync) if self.fsync else None,
            "end_fsync": "1" if self.end_fsync else None,
        }
        opts.update({k: v for k, v in optional.items() if v is not None})
        for key, value in self.extra:
            opts[key] = value
        return opts

    def verifier(self) -> FioJob:
        """The read-back job that checks what this job wrote, up to its saved write state."""
        if not self.verify:
            raise ConfigError(f"fio job {self.name} has no verify= option to check against")
        return replace(
            self,
            verify_only=True,
            do_verify=True,
            verify_state_load=True,
            verify_state_save=None,
            time_based=False,
            runtime=None,
        )


def job_file(jobs: Sequence[FioJob], global_options: Mapping[str, str] | None = None) -> str:
    """The text of an INI job file."""
    for job in jobs:
        if not job.name or any(c in job.name for c in "[]\n"):
            raise ConfigError(f"invalid fio job name {job.name!r}")
    lines: list[str] = []
    if global_options:
        lines.append("[global]")
        lines += [f"{k}={v}" for k, v in global_options.items()]
        lines.append("")
    for job in jobs:
        lines.append(f"[{job.name}]")
        lines += [f"{k}={v}" for k, v in job.options().items()]
        lines.append("")
    return "\n".join(lines)


# -- results -------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Completion latency in microseconds."""

    mean_us: float
    max_us: float
    percentiles_us: dict[float, float] = field(default_factory=dict)

    def p(self, pct: float) -> float:
        return self.percentiles_us[pct]


@dataclass(frozen=True)
class DirectionStats:
    io_bytes: int
    bw_bytes: float  # per second
    iops: float
    total_ios: int
    runtime_ms: int
    clat: Latency


@dataclass(frozen=True)
class JobResult:
    name: str
    error: int
    read: DirectionStats
    write: DirectionStats
    trim: DirectionStats


@dataclass(frozen=True)
class FioResult:
    version: str
    jobs: tuple[JobResult, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(1 for j in self.jobs if j.error)

    @property
    def read_iops(self) -> float:
        return sum(j.read.iops for j in self.jobs)

    @property
    def write_iops(self) -> float:
        return sum(j.write.iops for j in self.jobs)

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops


def _latency(d: Mapping[str, Any]) -> Latency:
    clat = d.get("clat_ns") or {}
    pct = {float(k): v / 1000.0 for k, v in (clat.get("percentile") or {}).items()}
    return Latency(clat.get("mean", 0.0) / 1000.0, clat.get("max", 0) / 1000.0, pct)


def _direction(d: Mapping[str, Any] | None) -> DirectionStats:
    d = d or {}
    return DirectionStats(
        io_bytes=int(d.get("io_bytes", 0)),
        bw_bytes=float(d.get("bw_bytes", d.get("bw", 0) * 1024)),
        iops=float(d.get("iops", 0.0)),
        total_ios=int(d.get("total_ios", 0)),
        runtime_ms=int(d.get("runtime", 0)),
        clat=_latency(d),
    )


def parse_fio_json(text: str) -> FioResult:
    """Parse `--output-format=json` output; fio may print notes before the JSON object."""
    start = text.find("{")
    if start < 0:
        raise ConfigError(f"no JSON in fio's output: {text[:300]!r}")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError as exc:
        raise ConfigError(
            f"fio printed invalid JSON ({exc}): {text[start : start + 300]!r}"
        ) from exc
    # Client runs wrap each server's output: {"client_stats": [...]} (one entry per job,
    # plus an "All clients" summary when several servers ran).
    jobs_raw = data.get("jobs")
    if jobs_raw is None:
        jobs_raw = [j for j in data.get("client_stats", []) if j.get("jobname") != "All clients"]
    jobs = tuple(
        JobResult(
            name=j.get("jobname", ""),
            error=int(j.get("error", 0)),
            read=_direction(j.get("read")),
            write=_direction(j.get("write")),
            trim=_direction(j.get("trim")),
        )
        for j in jobs_raw
    )
    return FioResult(str(data.get("fio version", "")), jobs, data)


# -- running in the guest ----------------------------------------------------------


def run_fio(
    ssh: SSHSession,
    jobs: Sequence[FioJob],
    *,
    timeout: float = 600.0,
    global_options: Mapping[str, str] | None = None,
    check: bool = True,
) -> FioResult:
    """Run `jobs` with fio inside the guest and return the parsed JSON results."""
    path = f"/tmp/powercut-{int(time.time() * 1000)}.fio"
    ssh.put_bytes(job_file(jobs, global_options).encode(), path)
    result = ssh.run(f"fio --output-format=json {shlex.quote(path)}", timeout=timeout)
    if check and result.exit_code != 0:
        raise CommandError(f"fio {path}", result.exit_code, result.stdout, result.stderr)
    parsed = parse_fio_json(result.stdout)
    if check and parsed.errors:
        raise CommandError(
            f"fio {path}",
            result.exit_code,
            result.stdout,
            f"{parsed.errors} job(s) reported errors; {result.stderr}",
        )
    return parsed


def start_fio_server(ssh: SSHSession, port: int, timeout: float = 60.0) -> None:
    """Start `fio --server` in the guest (unless one listens already) and wait until it listens."""
    # /proc/net/tcp{,6}: the local address ends with the port in hex; state 0A = LISTEN.
    probe = f"grep -qE ':{port:04X} [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6"
    if ssh.run(probe, timeout=timeout).ok:
        return
    ssh.run(f"fio --server=,{port} --daemonize=/run/fio-server.pid", timeout=timeout, check=True)
    deadline = time.monotonic() + timeout
    while not ssh.run(probe, timeout=timeout).ok:
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"fio --server did not listen on port {port} in {timeout:.0f}s")
        time.sleep(0.1)


@dataclass(frozen=True)
class ClientRun:
    exit_code: int
    output: str  # fio's JSON (or text) output
    log: str  # the client's own stdout/stderr
    state_files: tuple[Path, ...]  # verify state received from the server

    def result(self) -> FioResult:
        return parse_fio_json(self.output)


class FioClient:
    """The host side of fio client/server, run through subprocess in `workdir`.

    The verify state files the server sends back land in `workdir`, which a
    later verify run must use again.
    """

    def __init__(self, host: str, port: int, workdir: Path, fio: str = FIO) -> None:
        self.host = host
        self.port = port
        self.workdir = Path(workdir)
        self.fio = fio
        self.workdir.mkdir(parents=True, exist_ok=True)

    def run(
        self,
        jobs: Sequence[FioJob],
        *,
        trigger: str | None = None,
        trigger_timeout: float | None = None,
        trigger_remote: str | None = None,
        timeout: float = 600.0,
        name: str = "client",
    ) -> ClientRun:
        jobpath = self.workdir / f"{name}.fio"
        jobpath.write_text(job_file(jobs))
        out = self.workdir / f"{name}.json"
        out.unlink(missing_ok=True)
        # Options before --client are the client's own; after it they go to the server.
        argv = [self.fio, "--output-format=json", f"--output={out}"]
        if trigger_timeout is not None:
            argv.append(f"--trigger-timeout={int(trigger_timeout)}")
        if trigger is not None:
            argv.append(f"--trigger={trigger}")
        if trigger_remote is not None:
            argv.append(f"--trigger-remote={trigger_remote}")
        argv += [f"--client={self.host},{self.port}", str(jobpath)]
        log.info("fio client: %s", " ".join(argv))
        try:
            # Short-lived and bounded by `timeout`, so subprocess.run rather than a
            # ManagedProcess; its own group dies with it on timeout.
            proc = subprocess.run(
                argv,
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutExpired(
                f"fio client did not finish in {timeout:.0f}s: {' '.join(argv)}"
            ) from exc
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.fio} is not installed on the host; run ci/bootstrap") from exc
        output = out.read_text(errors="replace") if out.exists() else ""
        states = tuple(sorted(self.workdir.glob("*verify.state")))
        return ClientRun(proc.returncode, output, proc.stdout + proc.stderr, states)
