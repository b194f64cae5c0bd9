"""Host side of `fsmeta`: the command lines, the ack stream and the `--check` JSON."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from harness.crash.scenario import FsMetaSpec
from harness.errors import GuestError

PROGRAM = "/usr/local/bin/fsmeta"
DEFAULT_WINDOW = 16  # unacknowledged ops the check tolerates (ack lines lost in flight)


def write_command(spec: FsMetaSpec, directory: str, seed: int, program: str = PROGRAM) -> str:
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
    spec: FsMetaSpec,
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
class FsMetaObservation:
    acked: int  # the last operation acknowledged to the host
    check: FsMetaCheck


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
