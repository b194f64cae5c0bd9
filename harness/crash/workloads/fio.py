"""fio verify as a crash workload: the job options for the two phases.

The write phase runs in the guest's fio server, driven by the host client
with a trigger, and saves its verify state when the trigger fires (fio
HOWTO, "Verification trigger"). After the reboot the verify phase loads that
state, so fio checks only what it had completed before the cut. A scenario
gives fio's own options; the ones that make this work are set here and may
not be overridden.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from harness.crash.scenario import FioVerifySpec, OptionValue
from harness.errors import GuestError
from harness.guest.fio import RW, FioJob


@dataclass(frozen=True)
class FioVerifyObservation:
    verify_errors: int  # blocks fio found with bad content (fio's verify failures)
    blocks_verified: int = 0
    io_errors: int = 0
    bad_offsets: tuple[int, ...] = ()  # byte offsets of the first bad blocks fio named


DEFAULTS: dict[str, OptionValue] = {
    "rw": "randwrite",
    "bs": "4k",
    "size": "32M",
    "ioengine": "libaio",
    "iodepth": 8,
    "direct": 1,
    "verify": "crc32c",
}


def write_options(spec: FioVerifySpec, filename: str, seed: int) -> dict[str, OptionValue]:
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


def verify_options(spec: FioVerifySpec, filename: str, seed: int) -> dict[str, OptionValue]:
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


def write_job(spec: FioVerifySpec, filename: str, seed: int, name: str = "crash") -> FioJob:
    return to_job(name, write_options(spec, filename, seed))


def verify_job(spec: FioVerifySpec, filename: str, seed: int, name: str = "crash") -> FioJob:
    """Same job name as the write phase: fio finds the saved state by job name."""
    return to_job(name, verify_options(spec, filename, seed))


# fio's verify failure lines (verify.c), possibly prefixed by a client's hostname:
#   verify: bad magic header 0, wanted acca at file /dev/vda offset 8192, length 4096 ...
#   crc32c: verify failed at file /dev/vda offset 4096, length 4096 ...
_VERIFY_FAILURE = re.compile(
    r"(?:^|\s)(?:verify: bad \w+|\w+: verify failed)\b.*?\bat file \S+ offset (\d+)", re.MULTILINE
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
    offsets = tuple(int(m.group(1)) for m in _VERIFY_FAILURE.finditer(stderr_text))
    start = json_text.find("{")
    if start < 0:
        if offsets:
            return FioVerifyObservation(len(offsets), 0, 0, offsets)
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
    return FioVerifyObservation(errors, bytes_read // bs, 0, offsets)
