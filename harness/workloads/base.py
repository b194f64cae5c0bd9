"""The `Workload` interface: what runs on the disk under test, and how it is checked.

A workload is one object (one module in this package, registered in
`harness.workloads.registry`) that knows how to:

* read its own fields from a scenario's `[[workload]]` table (`parse`);
* prepare the disk: whether it needs a filesystem and which directories in
  it (`needs_filesystem`, `directories`);
* run in the guest while streaming what it acknowledged (`start` → `Run`);
* say which checkers can judge it (`checkers`, its own is `checker`) and
  whether what it acknowledged is covered by a promise
  (`keeps_acknowledged`);
* check after the reboot, or in the same boot after a backend crash
  (`check` → an `Observation`).

The runner (`harness.crash.cell_run`), the verdict (`harness.crash.verdict`)
and the results (`harness.crash.record`) dispatch through this interface and
nothing else, so a new workload touches no other module. Three checkers are not
any workload's own: the durability oracle (`ORACLE`, host side, on the image
the cut left), the filesystem's checker (`FSCK`, `harness.workloads.filesystem`)
and, on a qcow2 disk, `qemu-img check` (`QEMU_IMG_CHECK`, `harness.workloads.qemu_img`).

See docs/architecture.md, "Adding a workload".
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from harness.durability.contract import FaultModel, Promise
from harness.durability.writelog import WriteLog, read_log
from harness.guest.ssh import SSHSession

ORACLE = "oracle"  # the durability oracle on the image, from the write log
FSCK = "fsck"  # mount (journal replay), then the filesystem's own checker
QEMU_IMG_CHECK = "qemu-img-check"  # host side, on a qcow2 image after the cut (qemu_img.py)

MOUNT = "/mnt"  # where the runner mounts the filesystem under test in the guest
DEVICE = "/dev/vda"  # the disk under test, in the guest
POLL = 0.02  # seconds between looks at a running workload

E = TypeVar("E", bound=enum.Enum)
OptionValue = str | int | float | bool


class FieldReader(Protocol):
    """How a workload reads its `[[workload]]` table (the scenario parser provides it).

    Every method marks the key as known; unknown keys are rejected after
    `parse` returns, with the file, line and the valid fields.
    """

    def has(self, key: str) -> bool: ...

    def string(self, key: str, default: str | None = None) -> str: ...

    def optional_string(self, key: str) -> str | None: ...

    def integer(self, key: str, default: int, minimum: int | None = None) -> int: ...

    def boolean(self, key: str, default: bool) -> bool: ...

    def number(self, key: str, default: float, minimum: float | None = None) -> float: ...

    def size(self, key: str, default: int, minimum: int = 1) -> int: ...

    def choice(self, key: str, enum_type: type[E], default: E | None = None) -> E: ...

    def options(
        self, key: str, reserved: Sequence[str] = (), reason: str = "is reserved"
    ) -> tuple[tuple[str, OptionValue], ...]:
        """A table of free-form options (a tool's own names); `reserved` names are refused."""
        ...

    def error(self, key: str, message: str) -> Exception: ...


class GuestContext(Protocol):
    """What a running workload may use of its guest and cell (the runner provides it)."""

    @property
    def ssh(self) -> SSHSession: ...

    @property
    def directory(self) -> Path:
        """The cell's artifact directory (logs a workload keeps go here)."""
        ...

    def host_port(self, guest_port: int) -> int:
        """The 127.0.0.1 port forwarded to `guest_port` in the guest."""
        ...

    @property
    def fio_server_port(self) -> int | None: ...

    def time_left(self, cap: float | None = None) -> float:
        """Seconds left of the cell's timeout (at least 1), capped at `cap`."""
        ...

    def check_deadline(self, what: str) -> None:
        """Raise `TimeoutExpired` naming `what` when the cell's timeout has passed."""
        ...

    def traced(self, command: str) -> str:
        """`command` (the workload's run, a /bin/sh command) as the cell traces it: called
        once, after the setup and before the run starts; unchanged when nothing traces."""
        ...


@dataclass(frozen=True)
class Tally:
    """A checker's headline figures for a cell: how much was acknowledged and lost."""

    acknowledged: int
    lost: int
    unit: str  # "sectors", "records", "files"
    durable: int | None = None  # None: all acknowledged if the checker must find everything
    corrupt: int = 0


class Observation(abc.ABC):
    """What one checker saw. The verdict judges `loss`/`corrupt`; the report keeps the rest."""

    @property
    @abc.abstractmethod
    def loss(self) -> bool:
        """Something acknowledged (or required by the contract) was not found."""

    @property
    def corruption(self) -> bool:
        """Content was found that nothing ever wrote (never allowed)."""
        return False

    @abc.abstractmethod
    def summary(self) -> str:
        """One line: what was lost, or what was found intact."""

    def tally(self) -> Tally | None:
        """The figures results.json headlines for the cell, if this checker has them."""
        return None

    def against_device_log(self, wlog: WriteLog) -> Observation:
        """This observation with what the disk's write log settles (the log as the cut left
        it). A checker that claims a loss the disk never acknowledged (its write still in
        flight, or failed) overrides this to say so; by default the log settles nothing."""
        return self

    def details(self) -> dict[str, Any]:
        """The raw observation, JSON-ready (results.json: a checker's `details`)."""
        if dataclasses.is_dataclass(self):
            return json.loads(json.dumps(dataclasses.asdict(self), default=str))
        return {}


def settle_with_device_log(
    observations: Mapping[str, Observation], log: Path | None
) -> dict[str, Observation]:
    """The checkers' observations with what the disk's write log settles
    (`Observation.against_device_log`); the log is read only when one of them saw a loss."""
    if log is None or not any(o.loss for o in observations.values()):
        return dict(observations)
    wlog = read_log(log)
    return {name: o.against_device_log(wlog) for name, o in observations.items()}


class Run(abc.ABC):
    """A workload running in the guest, from `Workload.start` until it is checked."""

    def __init__(self, fault: FaultModel) -> None:
        self.fault = fault
        self.started = time.monotonic()

    @property
    def cuts_itself(self) -> bool:
        """The workload picks the cut moment itself (fio's trigger); the runner waits for it."""
        return False

    @abc.abstractmethod
    def acked(self) -> int:
        """How many acknowledgements the host has received so far."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """Still running (the runner stops waiting for its cut moment when it is not)."""

    def failure(self) -> str | None:
        """Why the workload itself failed, if it did (not because the power was cut)."""
        return None

    def wait_until_cut(self, ctx: GuestContext, seconds: float) -> None:
        """For a workload that cuts itself: let it cut after about `seconds`; return once it has."""
        raise NotImplementedError(f"{type(self).__name__} does not cut by itself")

    def after_cut(self, timeout: float) -> None:  # noqa: B027 - most runs have nothing to collect
        """The guest is gone: collect what was acknowledged in flight."""

    def after_backend_crash(  # noqa: B027 - a run that ends by itself needs nothing here
        self, ctx: GuestContext, acked_at_crash: int
    ) -> None:
        """The backend is back: let the workload go on for a while, then stop it."""


class Workload(abc.ABC):
    """One kind of guest workload; an instance holds one scenario's parameters."""

    kind: ClassVar[str]  # the scenario's `kind = "..."`
    checker: ClassVar[str]  # the name of this workload's own checker
    checkers: ClassVar[tuple[str, ...]]  # every checker that can judge it; the default set
    needs_filesystem: ClassVar[bool] = True  # the runner makes one on the host and mounts it
    # The `after-acked-writes` cut counts this workload's acknowledgements (True) or the
    # write requests the device received (False: a workload without acknowledgements).
    counts_acknowledgements: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def parse(cls, fields: FieldReader) -> Workload:
        """Read this kind's fields from its `[[workload]]` table."""

    @property
    def directories(self) -> tuple[str, ...]:
        """Directories the fresh filesystem must hold before the workload starts."""
        return ()

    @property
    def trace_pattern(self) -> str | None:
        """The acknowledgement regex (one group, the token) when the runner should trace this
        workload's run for the explanation of a loss (`GuestContext.traced`); None: not."""
        return None

    def refuse(self, *, timed_cut: bool, fault: FaultModel) -> str | None:
        """Why this workload cannot run a cell the schema allows, if it cannot (before booting)."""
        return None

    @abc.abstractmethod
    def keeps_acknowledged(self, promise: Promise) -> bool:
        """Whether everything it acknowledges is kept under `promise` (else loss is allowed)."""

    @abc.abstractmethod
    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        """Start in the guest (the filesystem, if any, is mounted at `MOUNT`)."""

    @abc.abstractmethod
    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        """Check after the reboot (filesystem mounted), or after a backend crash in that boot."""

    def describe(self) -> dict[str, Any]:
        """The parameters, JSON-ready (for listings and results)."""
        if dataclasses.is_dataclass(self):
            return json.loads(json.dumps(dataclasses.asdict(self), default=str))
        return {}


def wait_for(
    condition: Callable[[], bool], ctx: GuestContext, what: str, poll: float = POLL
) -> None:
    """Poll `condition` until true, within the cell's deadline."""
    while not condition():
        ctx.check_deadline(what)
        time.sleep(poll)
