"""The fs-metadata workload: create, write, rename and unlink with file and directory fsync.

(Called ext4-metadata while ext4 was the only filesystem; that name still works.)

The guest program (`images/guest-src/fsmeta.c`) prints one line per
operation it has made durable, and after the reboot `--check` replays the
same seeded operations up to the last acknowledged one and compares every
file (name, size, content); operations after it may or may not be there.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from harness.durability.contract import FaultModel, Promise
from harness.errors import GuestError
from harness.workloads.base import (
    FSCK,
    MOUNT,
    ORACLE,
    FieldReader,
    GuestContext,
    Observation,
    Run,
    Tally,
    Workload,
)
from harness.workloads.stream import StreamRun

PROGRAM = "/usr/local/bin/fsmeta"
DEFAULT_WINDOW = 16  # unacknowledged ops the check tolerates (ack lines lost in flight)
DIRECTORY = "fsmeta"  # made in the fresh filesystem, so the workload's first fsync has a parent


@dataclass(frozen=True)
class FsMeta(Workload):
    """`kind = "fs-metadata"`: `ops` (0: until the cut), `files`, `max-size`."""

    ops: int = 0  # 0: until cut
    files: int = 32
    max_size: int = 16384

    kind = "fs-metadata"
    checker = "fsmeta"
    checkers = (ORACLE, "fsmeta", FSCK)

    @classmethod
    def parse(cls, fields: FieldReader) -> FsMeta:
        return cls(
            ops=fields.integer("ops", 0, minimum=0),
            files=fields.integer("files", 32, minimum=1),
            max_size=fields.size("max-size", 16384, minimum=1),
        )

    @property
    def directories(self) -> tuple[str, ...]:
        return (DIRECTORY,)

    def keeps_acknowledged(self, promise: Promise) -> bool:
        # Every operation is acknowledged after its file and directory fsync.
        return promise is not Promise.NOTHING

    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        command = write_command(self, f"{MOUNT}/{DIRECTORY}", seed)
        return StreamRun(ctx, command, self.kind, fault)

    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        acked = run.acked()
        command = check_command(self, f"{MOUNT}/{DIRECTORY}", seed, acked)
        text = ctx.ssh.run(command, timeout=120)
        with open(ctx.directory / "checks.log", "a") as out:
            out.write(f"$ {command}\n{text.stdout}{text.stderr}\n")
        return FsMetaObservation(acked, parse_check(text.stdout))


def write_command(spec: FsMeta, directory: str, seed: int, program: str = PROGRAM) -> str:
    argv = [
        program,
        "--ops",
        str(spec.ops),
        "--seed",
        str(seed),
        "--files",
        str(spec.files),
        "--max-size",
        str(spec.max_size),
        directory,
    ]
    return shlex.join(argv)


def check_command(
    spec: FsMeta,
    directory: str,
    seed: int,
    acked: int,
    window: int = DEFAULT_WINDOW,
    program: str = PROGRAM,
) -> str:
    argv = [
        program,
        "--check",
        "--acked",
        str(acked),
        "--window",
        str(window),
        "--seed",
        str(seed),
        "--files",
        str(spec.files),
        "--max-size",
        str(spec.max_size),
        directory,
    ]
    return shlex.join(argv)


@dataclass(frozen=True)
class FsMetaFailure:
    name: str
    expected: str
    found: str


@dataclass(frozen=True)
class FsMetaCheck:
    acked: int
    checked: int
    uncertain: int
    failure_count: int
    failures: tuple[FsMetaFailure, ...]  # the first 64

    @property
    def ok(self) -> bool:
        return self.failure_count == 0


@dataclass(frozen=True)
class FsMetaObservation(Observation):
    acked: int  # the last operation acknowledged to the host
    check: FsMetaCheck

    @property
    def loss(self) -> bool:
        return not self.check.ok

    def summary(self) -> str:
        if self.loss:
            first = self.check.failures[0] if self.check.failures else None
            detail = (
                f"; {first.name}: expected {first.expected}, found {first.found}" if first else ""
            )
            return (
                f"{self.check.failure_count} files differ from {self.acked} acknowledged "
                f"operations{detail}"
            )
        return f"every effect of {self.acked} acknowledged operations found"

    def tally(self) -> Tally:
        return Tally(acknowledged=self.acked, lost=self.check.failure_count, unit="files")


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GuestError(f"fsmeta --check output: field {key!r} is missing or not an integer")
    return value


def parse_check(text: str) -> FsMetaCheck:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GuestError(f"fsmeta --check printed no JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("failures"), list):
        raise GuestError("fsmeta --check output has no 'failures' list")
    failures = tuple(
        FsMetaFailure(str(f["name"]), str(f["expected"]), str(f["found"])) for f in data["failures"]
    )
    return FsMetaCheck(
        acked=_int(data, "acked"),
        checked=_int(data, "checked"),
        uncertain=_int(data, "uncertain"),
        failure_count=_int(data, "failure_count"),
        failures=failures,
    )
