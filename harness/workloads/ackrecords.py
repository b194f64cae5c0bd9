"""The ack-records workload: numbered, checksummed records appended with fsync.

The guest program (`images/guest-src/ackrecords.c`) prints one line per
record it has made durable as it was asked to (fsync, fdatasync or nothing),
and after the reboot `--check` prints JSON: how many records from 1 on are
intact. Every acknowledged record must be found wherever the promise covers
what the guest synced.
"""

from __future__ import annotations

import enum
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

PROGRAM = "/usr/local/bin/ackrecords"
RECORDS = f"{MOUNT}/records"


class SyncMode(enum.Enum):
    FSYNC = "fsync"
    FDATASYNC = "fdatasync"
    NONE = "none"


@dataclass(frozen=True)
class AckRecords(Workload):
    """`kind = "ack-records"`: `records` (0: until the cut), `record-size`, `sync`."""

    records: int = 0  # 0: until cut
    record_size: int = 4096
    sync: SyncMode = SyncMode.FSYNC

    kind = "ack-records"
    checker = "ack-records"
    checkers = (ORACLE, "ack-records", FSCK)

    @classmethod
    def parse(cls, fields: FieldReader) -> AckRecords:
        return cls(
            records=fields.integer("records", 0, minimum=0),
            record_size=fields.size("record-size", 4096, minimum=64),
            sync=fields.choice("sync", SyncMode, SyncMode.FSYNC),
        )

    def keeps_acknowledged(self, promise: Promise) -> bool:
        # A record is acknowledged after its sync returned: kept wherever flushed data is.
        return self.sync is not SyncMode.NONE and promise is not Promise.NOTHING

    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        return StreamRun(ctx, write_command(self, RECORDS, seed), self.kind, fault)

    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        text = ctx.ssh.run(check_command(self, RECORDS, seed), timeout=120)
        with open(ctx.directory / "checks.log", "a") as out:
            out.write(f"$ ackrecords --check\n{text.stdout}{text.stderr}\n")
        return AckRecordsObservation(run.acked(), parse_check(text.stdout))


def write_command(spec: AckRecords, path: str, seed: int, program: str = PROGRAM) -> str:
    """The guest command that writes records and streams one line per acknowledged record."""
    argv = [
        program,
        "--sync",
        spec.sync.value,
        "--size",
        str(spec.record_size),
        "--records",
        str(spec.records),
        "--seed",
        str(seed),
        path,
    ]
    return shlex.join(argv)


def check_command(spec: AckRecords, path: str, seed: int, program: str = PROGRAM) -> str:
    argv = [program, "--check", "--size", str(spec.record_size), "--seed", str(seed), path]
    return shlex.join(argv)


@dataclass(frozen=True)
class InvalidRecord:
    seq: int
    offset: int
    reason: str  # zero, short, bad-magic, bad-size, bad-checksum, bad-seq, bad-seed, bad-payload


@dataclass(frozen=True)
class AckRecordsCheck:
    """What `ackrecords --check` found in the file after the reboot."""

    exists: bool
    record_size: int
    file_size: int
    highest_contiguous: int  # records 1..N all valid
    valid: int
    invalid_count: int
    invalid: tuple[InvalidRecord, ...]  # the first 64

    def first_invalid_after(self, seq: int) -> InvalidRecord | None:
        return next((r for r in self.invalid if r.seq > seq), None)


@dataclass(frozen=True)
class AckRecordsObservation(Observation):
    """The acknowledged records against what was found: the verdict's input."""

    acked: int  # the highest sequence number the host received
    check: AckRecordsCheck

    @property
    def found(self) -> int:
        return self.check.highest_contiguous

    @property
    def missing(self) -> int:
        """Acknowledged records not found intact (0 when the file holds all of them)."""
        return max(0, self.acked - self.found)

    @property
    def loss(self) -> bool:
        return self.missing > 0

    def summary(self) -> str:
        if self.loss:
            bad = self.check.first_invalid_after(self.found)
            where = f" (record {bad.seq} at offset {bad.offset}: {bad.reason})" if bad else ""
            return f"records 1..{self.acked} acknowledged, only 1..{self.found} found{where}"
        return f"all {self.acked} acknowledged records found ({self.check.valid} valid in the file)"

    def tally(self) -> Tally:
        return Tally(acknowledged=self.acked, lost=self.missing, unit="records")


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise GuestError(
            f"ackrecords --check output: field {key!r} is missing or not {kind.__name__}"
        )
    return value


def parse_check(text: str) -> AckRecordsCheck:
    """Parse `ackrecords --check` stdout (one JSON object)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GuestError(f"ackrecords --check printed no JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise GuestError(f"ackrecords --check printed {type(data).__name__}, not an object")
    invalid = tuple(
        InvalidRecord(int(r["seq"]), int(r["offset"]), str(r["reason"]))
        for r in _field(data, "invalid", list)
    )
    return AckRecordsCheck(
        exists=_field(data, "exists", bool),
        record_size=_field(data, "record_size", int),
        file_size=_field(data, "file_size", int),
        highest_contiguous=_field(data, "highest_contiguous", int),
        valid=_field(data, "valid", int),
        invalid_count=_field(data, "invalid_count", int),
        invalid=invalid,
    )
