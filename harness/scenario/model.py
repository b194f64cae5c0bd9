"""What a scenario file says, as frozen values: the input of `harness.scenario.cells`.

The contract's vocabulary (cache modes, faults, cut policies) is
`harness.durability.contract`'s; the workloads are `harness.workloads`'
objects, each holding its own parameters. Only what belongs to no one else
is defined here: when to cut, what a scenario expects, blkdebug rules.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from harness.block.drivers.blkdebug import Rule
from harness.durability.contract import CacheMode, CutPolicy, FaultModel
from harness.explore.spec import ExploreSpec
from harness.scenario.cluster import ClusterSpec
from harness.vm.backends import Backend
from harness.workloads.base import OptionValue, Workload


class TriggerKind(enum.Enum):
    AFTER_SECONDS = "after-seconds"
    AFTER_ACKED_WRITES = "after-acked-writes"
    AFTER_FLUSHES = "after-flushes"
    WINDOW = "window"  # seeded-random time in [a, b] seconds
    AFTER_EXIT = "after-exit"  # right after the workload's run exits (it must exit 0)

    @property
    def timed(self) -> bool:
        return self in (TriggerKind.AFTER_SECONDS, TriggerKind.WINDOW)


class Expectation(enum.Enum):
    """What a scenario expects, when it differs from the mode's contract."""

    CONTRACT = "contract"  # observed must lie inside the contract (the default)
    VIOLATION = "violation"  # a negative control: passes only when the loss is detected


@dataclass(frozen=True)
class FaultSpec:
    """One fault model; a host power cut may list several policies (one cell each)."""

    model: FaultModel
    policies: tuple[CutPolicy, ...] = ()
    seed: int | None = None  # fixed policy seed; None derives it from the cell seed


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class CutSpec:
    """When to cut. `value` is seconds, acked writes or flushes; `window` is [a, b] seconds."""

    kind: TriggerKind
    value: float = 0.0
    window: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        if self.kind is TriggerKind.WINDOW:
            assert self.window is not None
            return f"window-{_num(self.window[0])}-{_num(self.window[1])}s"
        if self.kind is TriggerKind.AFTER_SECONDS:
            return f"after-{_num(self.value)}s"
        if self.kind is TriggerKind.AFTER_ACKED_WRITES:
            return f"after-{int(self.value)}-acked"
        if self.kind is TriggerKind.AFTER_EXIT:
            return "after-exit"
        return f"after-{int(self.value)}-flushes"

    def resolve(self, seed: int) -> float:
        """The concrete threshold for one cell: the window draws a time from `seed`."""
        if self.window is not None:
            low, high = self.window
            return round(random.Random(seed).uniform(low, high), 3)
        return self.value


@dataclass(frozen=True)
class WorkloadSpec:
    """One `[[workload]]`: its name, the workload object, the checkers that judge it."""

    name: str
    workload: Workload
    checkers: tuple[str, ...]
    cuts: tuple[CutSpec, ...] = ()  # overrides the scenario's cuts for this workload

    @property
    def kind(self) -> str:
        return self.workload.kind


@dataclass(frozen=True)
class BlkdebugRule:
    """One blkdebug rule: the fields of `harness.block.drivers.blkdebug.Rule` (its JSON form)."""

    options: tuple[tuple[str, OptionValue], ...]

    def as_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def to_rule(self) -> Rule:
        return Rule.from_json(self.as_dict())


@dataclass(frozen=True)
class GuestSpec:
    """What the guest is made of beyond the default image: Debian packages, your own kernel."""

    packages: tuple[str, ...] = ()
    kernel: str | None = None  # a bzImage or vmlinux (absolute path)
    modules: str | None = None  # its lib/modules/VERSION tree (absolute path)

    @property
    def label(self) -> str:
        parts = list(self.packages)
        if self.kernel:
            parts.append(f"kernel {self.kernel}")
        return ", ".join(parts) or "the default guest"


class ImageFormat(enum.Enum):
    """The image format QEMU's block layer puts on the disk (powercut serves raw only)."""

    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True)
class DiskSpec:
    """The disk under a workload, all a session needs to make and serve it.

    Its filesystem is made on the host and mounted in the guest; None when
    the cell's workload needs none (it gets the raw disk). That is decided
    once, where the cell is built (`harness.scenario.cells`), and read from
    here after. Then whose block layer serves it, in which image format,
    through which blkdebug rules, and the directories the workload wants in
    the filesystem before the guest boots.
    """

    filesystem: str | None = "ext4"
    mkfs_options: tuple[str, ...] = ()  # extra mkfs arguments
    mount_options: str = ""  # mount -o OPTIONS (e.g. "nobarrier")
    backend: Backend = Backend.POWERCUT
    format: ImageFormat = ImageFormat.RAW
    # qcow2 creation options (`qemu-img create -o`), e.g. (("lazy_refcounts", "on"),).
    format_options: tuple[tuple[str, OptionValue], ...] = ()
    size: int = 256 << 20
    blkdebug: tuple[BlkdebugRule, ...] = ()  # rules for a blkdebug filter in the backend
    directories: tuple[str, ...] = ()  # the workload's, made with the filesystem


@dataclass(frozen=True)
class Scenario:
    path: str
    name: str
    description: str
    image: str
    modes: tuple[CacheMode, ...]
    faults: tuple[FaultSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    cuts: tuple[CutSpec, ...]
    repetitions: int = 1
    seed: int = 0
    expect: Expectation = Expectation.CONTRACT
    timeout: float = 300.0
    # One disk per filesystem the scenario lists (several: a matrix dimension), alike but
    # for it; a workload that needs no filesystem gets the first without one.
    disks: tuple[DiskSpec, ...] = (DiskSpec(),)
    guest: GuestSpec = field(default_factory=GuestSpec)
    # Files copied into the guest before the workload's setup: (guest path, host path).
    guest_files: tuple[tuple[str, str], ...] = ()
    explore: ExploreSpec | None = None  # the `[explore]` table (`powercut explore`)
    cluster: ClusterSpec | None = None  # the `[cluster]` table: N nodes, each its own disk

    @property
    def disk(self) -> DiskSpec:
        """The first disk: what every disk shares (size, options, backend, blkdebug rules)."""
        return self.disks[0]

    @property
    def filesystems(self) -> tuple[str | None, ...]:
        return tuple(d.filesystem for d in self.disks)

    @property
    def disk_size(self) -> int:
        return self.disk.size

    @property
    def blkdebug(self) -> tuple[BlkdebugRule, ...]:
        return self.disk.blkdebug
