"""One guest on one crash-test disk: boot, power cut, reboot — shared by the runner and pytest.

A `CrashSession` owns a disk image in a directory, the `powercut serve`
backend that serves it (log-writes over [blkdebug over] powerfail over the
file, so the write log sees what the guest was told and the journal models
what the host may lose) and the QEMU machine that boots on it. The pieces
are the other parts' own: `ProcessBackend` (harness.vm.backends) runs the
`powercut serve` its `ServeOptions` (harness.vm.daemons) describe, `QemuMachine`
boots, `apply_cut` (harness.durability.cut) applies a host power cut
offline, `oracle.check` judges the image.

The three faults (harness.durability.contract):

* guest power cut — QEMU is SIGKILLed; the backend stops cleanly, nothing reverts;
* host power cut — the backend is frozen (SIGSTOP), QEMU and it SIGKILLed, then the journal is
  reverted by a policy and seed (what a real host loses with its page cache);
* backend crash — the backend is SIGKILLed and restarted while the guest runs.

After a power cut `reboot()` serves the image again with a plain backend
(no fault drivers: the cut is over) and boots the same machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from harness.block.options import format_dotted
from harness.durability import oracle
from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    Promise,
    reference_promise,
)
from harness.durability.cut import CutResult, apply_cut
from harness.errors import ConfigError, MachineError, PowercutError
from harness.guest.ssh import SSHSession
from harness.scenario.cells import Cell
from harness.scenario.model import DiskSpec
from harness.vm.backends import ProcessBackend
from harness.vm.daemons import ServeOptions
from harness.vm.image import GuestImage
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, Disk, MachineSpec
from harness.workloads.base import Observation
from harness.workloads.filesystem import make_disk

log = logging.getLogger(__name__)

DISK_NAME = "disk"

# What a caller adds to a session's machine (a cluster node's private NIC and clock).
MachineSpecHook = Callable[[MachineSpec], MachineSpec]


def fault_graph(
    image: Path, journal: Path, write_log: Path, blkdebug_config: Path | None = None
) -> dict[str, Any]:
    """The graph the crash runs use: log-writes → [blkdebug →] powerfail → file.

    log-writes sits on top so the write log sees what the guest was told;
    powerfail at the bottom so the journal models what the host may lose.
    """
    leaf: dict[str, Any] = {
        "driver": "powerfail",
        "journal": str(journal),
        "file": {"driver": "file", "filename": str(image)},
    }
    if blkdebug_config is not None:
        leaf = {"driver": "blkdebug", "config": str(blkdebug_config), "file": leaf}
    return {"driver": "log-writes", "log": str(write_log), "file": leaf}


def fault_blockdev(
    image: Path, journal: Path, write_log: Path, blkdebug_config: Path | None = None
) -> str:
    """`fault_graph` in the dotted `--blockdev` form `powercut serve` takes."""
    return format_dotted(fault_graph(image, journal, write_log, blkdebug_config))


@dataclass(frozen=True)
class PowerCut:
    """What a power cut did and what the oracle found afterwards."""

    fault: FaultModel
    policy: CutPolicy | None
    seed: int | None
    oracle_mode: str  # the contract the oracle checked, by its cache mode's name
    cut: CutResult | None  # host power cut only
    oracle: oracle.OracleReport | None
    seconds: float
    # Host-side checkers that ran on the image the cut left, by checker name (qemu-img-check).
    checks: Mapping[str, Observation] = field(default_factory=dict)
    # The disk's write log as the cut left it (what it acknowledged), when it kept one.
    write_log: Path | None = None

    @property
    def ok(self) -> bool:
        """The oracle found the image inside the contract (True when it did not run)."""
        return self.oracle is None or self.oracle.ok


class DiskSession:
    """What every crash session shares: the cell's files, the machine, the cut and the oracle.

    A subclass builds its disk and its serving processes, then calls
    `_start_machine`; it says how the host's side of the disk freezes, dies
    and stops (`_freeze_host`, `_kill_host`, `_stop_host`) and may add
    host-side checks of the image a cut left (`host_checks`).
    """

    directory: Path
    mode: CacheMode
    disk: Path
    machine: QemuMachine
    rundir: Path

    @classmethod
    def for_cell(cls, cell: Cell) -> Any:
        """What makes this session for `cell`: the class, given what it needs of the cell."""
        return cls

    def _prepare(
        self, directory: Path, image: GuestImage, mode: CacheMode, spec: DiskSpec, disk_name: str
    ) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.disk = self.directory / disk_name
        self.guest_image = image
        self.mode = mode
        self.spec = spec
        self.journal = self.directory / "disk.journal"
        self.write_log = self.directory / "writes.log"
        # A fresh start: the write log and the journal continue existing files (that is
        # how they survive a backend crash), so leftovers of an earlier run must go.
        for stale in (self.journal, self.write_log, self.directory / "cut.json"):
            stale.unlink(missing_ok=True)
        self.blkdebug_config: Path | None = None
        self.cuts: list[PowerCut] = []
        # Sockets (vhost-user, control, QMP, NBD) live in a short private dir: unix socket
        # paths must fit 108 bytes, and a results directory can be deep.
        self.rundir = Path(tempfile.mkdtemp(prefix="pc-"))

    def _make_disk(self, path: Path) -> None:
        """The disk the spec describes, at `path` (its filesystem made here, on the host),
        and its blkdebug rules where the graph's blkdebug node reads them."""
        spec = self.spec
        make_disk(
            path,
            spec.size,
            filesystem=spec.filesystem,
            directories=spec.directories,
            mkfs_options=spec.mkfs_options,
        )
        if spec.blkdebug:
            self.blkdebug_config = self.directory / "blkdebug.json"
            self.blkdebug_config.write_text(
                json.dumps([r.to_rule().to_json() for r in spec.blkdebug], indent=1)
            )

    def _start_machine(
        self,
        disk: Disk,
        accel: Accel | None,
        memory_mib: int,
        name: str,
        machine_spec: MachineSpecHook | None = None,
    ) -> None:
        fs = self.spec.filesystem
        spec = MachineSpec.from_image(
            self.guest_image,
            disks=(disk,),
            memory_mib=memory_mib,
            name=name,
            needs=(fs,) if fs is not None else (),
        )
        if machine_spec is not None:
            spec = machine_spec(spec)  # a cluster node: its NIC, its clock (vm/cluster.py)
        self.machine = QemuMachine(spec, workdir=self.rundir / "vm", accel=accel, keep=True)

    # -- the host's side of the disk (the subclass's processes) ------------------

    def _freeze_host(self) -> None:
        """Stop the disk mid-request: nothing in flight may complete once the cut begins."""
        raise NotImplementedError

    def _kill_host(self) -> None:
        """The host's power is gone: kill the frozen processes."""
        raise NotImplementedError

    def _stop_host(self) -> None:
        """Stop the host's processes cleanly (they have nothing to lose)."""
        raise NotImplementedError

    # -- paths worth keeping ---------------------------------------------------

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    # -- the guest ---------------------------------------------------------------

    @property
    def ssh(self) -> SSHSession:
        return self.machine.ssh

    def host_port(self, guest_port: int) -> int:
        return self.machine.host_port(guest_port)

    @property
    def fio_server_port(self) -> int | None:
        return self.machine.spec.fio_server_port

    def power_off(self) -> None:
        """Pull the plug on the guest (no fault: used once a cell has what it needs)."""
        self.machine.power_cut()

    # -- the cut -------------------------------------------------------------------

    def freeze_disk(self) -> None:
        """A host power cut's first instant, taken early: the disk stops where it stands
        while the guest stays up (the tracer reads the trace's end and lists the tree
        through the page cache). Nothing the guest sends after this completes, so what
        the filesystem does meanwhile (ext4's 5 s journal commit, btrfs's 30 s
        transaction) cannot make durable what the run left unsynced; `power_cut` then
        cuts with the disk as it was here. Only for a host power cut: any other fault
        keeps the host's side running."""
        self._freeze_host()

    def power_cut(
        self,
        fault: FaultModel = FaultModel.HOST_POWER_CUT,
        policy: CutPolicy = CutPolicy.LOSE_ALL,
        seed: int = 0,
        *,
        check: bool = True,
    ) -> PowerCut:
        """Cut the power; then (with `check`) judge the image as the cut left it.

        The oracle and the host-side checks run before any reboot: the
        guest's recovery (journal replay) would change the image the
        contract is about.
        """
        t0 = time.monotonic()
        self.freeze(fault)
        self.machine.power_cut()
        return self.settle(fault, policy, seed, check=check, started=t0)

    # A cluster cuts many sessions at one instant: every disk frozen, then every QEMU
    # killed (harness/vm/cluster.py), then each session settles. `power_cut` is the three
    # steps for one guest.

    def freeze(self, fault: FaultModel) -> None:
        """The first instant of a cut: under a host power cut the disk stops mid-request.

        The host's power goes for QEMU and the disk at one instant: the disk must
        not finish (and make durable) what was in flight while QEMU is being killed.
        """
        if fault is FaultModel.BACKEND_CRASH:
            raise ConfigError("a backend crash is not a power cut: use crash_backend()")
        if fault is FaultModel.HOST_POWER_CUT:
            self._freeze_host()

    def settle(
        self,
        fault: FaultModel,
        policy: CutPolicy = CutPolicy.LOSE_ALL,
        seed: int = 0,
        *,
        check: bool = True,
        started: float | None = None,
    ) -> PowerCut:
        """After QEMU is dead: the host's processes end, the cut applies, the oracle judges."""
        t0 = time.monotonic() if started is None else started
        host = fault is FaultModel.HOST_POWER_CUT
        cut: CutResult | None = None
        chosen: CutPolicy | None = None
        if host:
            chosen = policy
            self._kill_host()
            cut = apply_cut(self.disk, self.journal, chosen, seed)
            (self.directory / "cut.json").write_text(json.dumps(cut.to_json(), indent=1) + "\n")
        else:
            self._stop_host()  # the host stays up: a clean stop, nothing reverted
        contract = reference_promise(self.oracle_mode, fault, chosen)
        report = self.check_oracle(contract) if check else None
        result = PowerCut(
            fault,
            chosen,
            seed if chosen else None,
            contract.mode_name,
            cut,
            report,
            time.monotonic() - t0,
            checks=self.host_checks(),
            write_log=self.write_log if self.write_log.exists() else None,
        )
        self.cuts.append(result)
        return result

    @property
    def oracle_mode(self) -> CacheMode:
        """The cache mode whose contract holds at the disk the write log records."""
        return self.mode

    def host_checks(self) -> dict[str, Observation]:
        """Host-side checkers on the image as the cut left it, by checker name (none here)."""
        return {}

    def check_oracle(self, contract: Promise) -> oracle.OracleReport:
        """The oracle on the image as it is now, against `contract` (written to oracle.json)."""
        report = oracle.check(self.disk, self.write_log, contract)
        (self.directory / "oracle.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
        log.info("oracle: %s", report.summary())
        return report

    # -- the end ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """A clean end: sync and power off the guest, then stop the host's processes."""
        self.machine.shutdown()
        self._stop_host()

    def close(self) -> None:
        try:
            self.machine.close()
        finally:
            try:
                self._stop_host()
            finally:
                # The machine's logs join the other artifacts; its run dir goes.
                for src, dst in (
                    (self.machine.console_log.path, self.console_log),
                    (self.machine.qemu_log, self.directory / "qemu.log"),
                ):
                    with contextlib.suppress(OSError):
                        shutil.copyfile(src, dst)
                shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CrashSession(DiskSession):
    """A guest on a crash-test disk served by powercut; leaves nothing running when closed."""

    def __init__(
        self,
        directory: Path,
        image: GuestImage,
        mode: CacheMode,
        spec: DiskSpec,
        *,
        accel: Accel | None = None,
        memory_mib: int = 512,
        name: str = "cell",
        machine_spec: MachineSpecHook | None = None,
    ) -> None:
        self._prepare(directory, image, mode, spec, "disk.img")
        try:
            self._make_disk(self.disk)
            self.socket = self.rundir / f"{DISK_NAME}.sock"
            self.backend = self.serve(
                fault_blockdev(self.disk, self.journal, self.write_log, self.blkdebug_config)
            )
            self._start_machine(self.backend.disk(), accel, memory_mib, name, machine_spec)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise

    def serve(self, blockdev: str | None) -> ProcessBackend[ServeOptions]:
        """`powercut serve` for the disk: on the `blockdev` graph, or (None) the plain file.

        Info logging, so the backend log shows connections and resubmissions.
        """
        options = ServeOptions(
            image=None if blockdev is not None else self.disk,
            blockdev=blockdev,
            socket=self.socket,
            cache=self.mode,
            verbose=1,
        )
        return ProcessBackend.logging_in(options, self.directory, DISK_NAME)

    # -- paths worth keeping ---------------------------------------------------

    @property
    def backend_log(self) -> Path:
        return self.backend.log_path

    def artifacts(self) -> dict[str, Path]:
        out = {
            "console_log": self.console_log,
            "qemu_log": self.directory / "qemu.log",
            "backend_log": self.backend_log,
            "write_log": self.write_log,
            "journal": self.journal,
        }
        for name in ("cut.json", "oracle.json", "blkdebug.json"):
            path = self.directory / name
            out[name.replace(".", "_")] = path
        return {k: v for k, v in out.items() if v.exists()}

    # -- lifecycle ---------------------------------------------------------------

    def boot(self, timeout: float = 120.0) -> SSHSession:
        """Start the backend (if it is not serving) and boot the guest on it."""
        if not self.backend.running:
            self.backend.start()
        return self.machine.boot(timeout)

    def requests(self, kind: str) -> int:
        """Requests of `kind` (OUT, FLUSH, ...) the backend has served; -1 when it cannot say."""
        try:
            return int(self.backend.stats().get("requests", {}).get(kind, 0))
        except (OSError, ValueError, PowercutError):
            return -1

    def crash_backend(self, timeout: float = 60.0) -> float:
        """SIGKILL the backend and start it again while the guest runs; seconds until back.

        The powerfail journal and the write log are continued by the new
        process; QEMU redials the socket and resubmits what was in flight.
        """
        t0 = time.monotonic()
        self.backend.kill()
        self.backend.start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, PowercutError):
                if self.backend.stats().get("connected"):
                    break
            if time.monotonic() > deadline:
                raise MachineError(
                    f"QEMU did not reconnect to the restarted backend in {timeout:.0f}s; "
                    f"backend log {self.backend_log}"
                )
            time.sleep(0.05)
        return time.monotonic() - t0

    def _freeze_host(self) -> None:
        self.backend.freeze()

    def _kill_host(self) -> None:
        self.backend.kill()

    def _stop_host(self) -> None:
        self.backend.stop()

    def reboot(self, timeout: float = 120.0) -> SSHSession:
        """Serve the image with a plain backend (the cut is over) and boot the guest again."""
        self.serve_after_cut()
        return self.boot(timeout)

    def serve_after_cut(self) -> None:
        """The image served again with a plain backend: the cut is over (a reboot's first half)."""
        if self.machine.running:
            raise MachineError("the guest is still running: power_cut() or shutdown() first")
        self.backend.stop()
        self.backend = self.serve(None)
        self.backend.start()
