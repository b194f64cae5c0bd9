"""The durability contract: per cache mode and fault, what must survive.

This is the one place that says it. The oracle reads `Promise.durable` to
know which logged writes must be on the image; the verdict reads `promise()`
to know what each checker must find; the report prints `Promise.value` and
`Promise.label`; `docs/architecture.md` and the README carry
`contract_table()` (a unit test keeps them equal).

Three faults, three promises:

* a **guest power cut** kills QEMU; the host keeps its page cache, so every
  write the backend completed survives, in every mode;
* a **host power cut** loses what was not made stable: in any subset and
  order, torn at sector granularity, within what the cache mode promised;
* a **backend crash** kills and restarts the backend under a running guest;
  nothing completed is lost and the guest sees no error.

Under a host power cut the cache modes differ (QEMU's `bdrv_parse_cache_mode`:
writethrough and directsync hide the write cache from the guest, so every
completed write was FUA; writeback and none make a write stable only through
a flush; unsafe never lets a flush reach the disk).

The vocabulary (cache modes, faults, cut policies, the verdict on whether a
cell kept its contract) lives here too, with the one parser of each, so that
`off` is an alias of `none` in exactly one place, and so that the report and
crash-state exploration (which sits below the report) judge in the same words.
"""

from __future__ import annotations

import enum

from harness.errors import ConfigError


class CacheMode(enum.Enum):
    """QEMU's cache modes; `harness.block.cache` maps each to its three settings."""

    WRITEBACK = "writeback"
    NONE = "none"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


MODE_ALIASES = {"off": CacheMode.NONE}  # QEMU's spelling of cache=none
VALID_MODES = "writeback, none (or off), writethrough, directsync, unsafe"


def parse_cache_mode(mode: str | CacheMode) -> CacheMode:
    """The `CacheMode` named by `mode` (QEMU's names; "off" is "none").

    Called only where a name enters (docs/architecture.md, "The cache mode,
    from `--mode` to O_DIRECT"): a scenario file, a command line, the pytest
    helpers' arguments, a `cache=` option; below them a `CacheMode` is carried.
    """
    if isinstance(mode, CacheMode):
        return mode
    if mode in MODE_ALIASES:
        return MODE_ALIASES[mode]
    try:
        return CacheMode(mode)
    except ValueError:
        raise ConfigError(f"invalid cache mode {mode!r}; valid modes: {VALID_MODES}") from None


def cache_mode_names() -> list[str]:
    """Every name `parse_cache_mode` accepts, aliases last (for choices and messages)."""
    return [m.value for m in CacheMode] + list(MODE_ALIASES)


class FaultModel(enum.Enum):
    GUEST_POWER_CUT = "guest-power-cut"  # QEMU killed; the host keeps its page cache
    HOST_POWER_CUT = "host-power-cut"  # QEMU killed and the volatile cache lost by a policy
    BACKEND_CRASH = "backend-crash"  # backend killed and restarted under a running guest


FAULT_ALIASES = {
    "guest": FaultModel.GUEST_POWER_CUT,
    "host": FaultModel.HOST_POWER_CUT,
    "backend": FaultModel.BACKEND_CRASH,
}


def parse_fault(fault: str | FaultModel) -> FaultModel:
    if isinstance(fault, FaultModel):
        return fault
    if fault in FAULT_ALIASES:
        return FAULT_ALIASES[fault]
    try:
        return FaultModel(fault)
    except ValueError:
        valid = ", ".join([*FAULT_ALIASES, *(f.value for f in FaultModel)])
        raise ConfigError(f"unknown fault {fault!r}; valid: {valid}") from None


class CutPolicy(enum.Enum):
    """Which of the writes a host power cut may lose are lost (`harness.durability.cut`)."""

    LOSE_ALL = "lose-all"
    KEEP_ALL = "keep-all"
    RANDOM = "random"
    PREFIX = "prefix"
    TORN = "torn"


def parse_policy(text: str | CutPolicy) -> CutPolicy:
    if isinstance(text, CutPolicy):
        return text
    try:
        return CutPolicy(text)
    except ValueError:
        valid = ", ".join(p.value for p in CutPolicy)
        raise ConfigError(f"unknown cut policy {text!r}; valid policies: {valid}") from None


class Promise(enum.Enum):
    """What survives: the three promises the table below hands out."""

    EVERY_COMPLETED = "every completed write"
    FLUSHED = "every write completed before a completed flush started, and every FUA write"
    NOTHING = "nothing"

    @property
    def label(self) -> str:
        """The promise in a few words, for a report's grid square."""
        return _LABELS[self]

    @property
    def mode_name(self) -> str:
        """The cache mode whose host-power-cut promise this is (how reports name it)."""
        return _MODE_NAMES[self]

    def durable(self, *, completed: bool, fua: bool, before_last_flush: bool) -> bool:
        """Whether a logged write must be on the image.

        `completed`: the guest was told it finished; `fua`: it was a FUA
        write; `before_last_flush`: it completed before the start of the
        last flush that completed.
        """
        if self is Promise.NOTHING or not completed:
            return False
        return self is Promise.EVERY_COMPLETED or fua or before_last_flush


_LABELS = {
    Promise.EVERY_COMPLETED: "keeps every completed write",
    Promise.FLUSHED: "keeps flushed writes",
    Promise.NOTHING: "may lose anything",
}
_MODE_NAMES = {
    Promise.EVERY_COMPLETED: "writethrough",
    Promise.FLUSHED: "writeback",
    Promise.NOTHING: "unsafe",
}

# A host power cut, per cache mode.
HOST_POWER_CUT = {
    CacheMode.WRITETHROUGH: Promise.EVERY_COMPLETED,
    CacheMode.DIRECTSYNC: Promise.EVERY_COMPLETED,
    CacheMode.WRITEBACK: Promise.FLUSHED,
    CacheMode.NONE: Promise.FLUSHED,
    CacheMode.UNSAFE: Promise.NOTHING,
}


class Verdict(enum.Enum):
    """A cell's verdict (and a checker's): the one vocabulary of runs, explorations, reports
    and tests."""

    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"  # the cell could not be run or a checker produced nothing
    SKIPPED = "skipped"


def promise(mode: CacheMode, fault: FaultModel, policy: CutPolicy | None = None) -> Promise:
    """What `mode` promises to keep across `fault` (a host cut that keeps all loses nothing)."""
    if fault is not FaultModel.HOST_POWER_CUT:
        return Promise.EVERY_COMPLETED
    if policy is CutPolicy.KEEP_ALL:
        return Promise.EVERY_COMPLETED
    return HOST_POWER_CUT[mode]


def reference_promise(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy | None = None
) -> Promise:
    """What loss is measured against: the promise, or for unsafe what its flushes told the guest.

    Under unsafe anything may go, but a checker still reports what was lost
    against the flushes the guest saw complete, so a loss is visible even
    where it is allowed (and a negative control can see it).
    """
    p = promise(mode, fault, policy)
    return Promise.FLUSHED if p is Promise.NOTHING else p


def host_cut_promise(mode: CacheMode) -> Promise:
    """The promise of `mode` across a host power cut (what `powercut check --mode` checks)."""
    return HOST_POWER_CUT[mode]


def contract_table() -> str:
    """The contract as a Markdown table (the docs carry exactly this)."""
    rows = [
        "| fault | cache mode | must survive |",
        "|---|---|---|",
        f"| guest power cut | every mode | {Promise.EVERY_COMPLETED.value} |",
        f"| backend crash | every mode | {Promise.EVERY_COMPLETED.value} |",
    ]
    for mode, p in HOST_POWER_CUT.items():
        rows.append(f"| host power cut | {mode.value} | {p.value} |")
    rows.append(
        f"| host power cut, policy keep-all | every mode | {Promise.EVERY_COMPLETED.value} |"
    )
    return "\n".join(rows)
