"""fio verify as a crash workload: the job options for the two phases.

The write phase runs in the guest's fio server, driven by the host client
with a trigger, and saves its verify state when the trigger fires (fio
HOWTO, "Verification trigger"). After the reboot the verify phase loads that
state, so fio checks only what it had completed before the cut. A scenario
gives fio's own options; the ones that make this work are set here and may
not be overridden.
"""

from __future__ import annotations

from harness.crash.scenario import FioVerifySpec, OptionValue

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
        }
    )
    return options


def job_file(name: str, options: dict[str, OptionValue]) -> str:
    """Render one fio job section."""
    lines = [f"[{name}]"]
    for key, value in options.items():
        if isinstance(value, bool):
            value = int(value)
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"
