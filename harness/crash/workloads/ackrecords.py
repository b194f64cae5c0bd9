"""Host side of `ackrecords`: the command lines, the ack stream and the `--check` JSON."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from harness.crash.scenario import AckRecordsSpec
from harness.crash.workloads.stream import AckStream
from harness.errors import GuestError

PROGRAM = "/usr/local/bin/ackrecords"

__all__ = [
    "AckRecordsCheck",
    "AckRecordsObservation",
    "AckStream",
    "InvalidRecord",
    "check_command",
    "parse_check",
    "write_command",
]


def write_command(spec: AckRecordsSpec, path: str, seed: int, program: str = PROGRAM) -> str:
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


def check_command(spec: AckRecordsSpec, path: str, seed: int, program: str = PROGRAM) -> str:
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
class AckRecordsObservation:
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
