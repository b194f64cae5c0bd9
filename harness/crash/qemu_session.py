"""QEMU's own block layer as the system under test, on a powercut disk that loses its cache.

`CrashSession` serves the guest from this project's block stack, which
reproduces QEMU's cache modes. `QemuSession` puts QEMU's *own* block layer
there instead — its format driver (raw or qcow2, with qcow2's metadata
caches), its cache mode, its FUA emulation and flush chain — on an NBD
connection to the powercut disk:

    guest ── virtio-blk ── QEMU: -blockdev qcow2|raw (cache.direct, cache.no-flush)
                                   └─ -blockdev nbd ──┐         device write-cache=on|off
    backend = "qemu-storage-daemon": the same two nodes in qsd, exported as vhost-user-blk
                                                      │ NBD (FUA, flush passed through)
    powercut serve --nbd, cache none:  log-writes → [blkdebug →] powerfail → file

The powercut disk must be a faithful disk, so that only QEMU's cache mode
decides what is durable: it is served with `cache=none` (`DISK_CACHE`), the
one mode whose semantics are a disk's with a volatile write cache — the
write cache is on toward QEMU (a write is volatile until QEMU flushes it or
sends it with FUA; no FUA emulation of its own, which writethrough and
directsync would add, making every write durable and hiding QEMU's
mistakes), every flush is honoured (unsafe would drop QEMU's flushes and
blame QEMU for it), and O_DIRECT keeps the powercut process's own host page
cache out of the picture (writeback would add one; powerfail models the
only volatile cache there is).

What the oracle checks at that disk: with `format = "raw"` QEMU maps the
guest's requests one to one onto the disk, FUA and flushes included, so the
guest's contract (the cell's cache mode, `harness.durability.contract`) is
checked on the disk's write log — a QEMU that dropped a FUA or a flush
would break it. With qcow2, QEMU adds writes of its own (metadata, copy on
write) and emulates FUA by a flush after the write, so a write that
completed at the disk was not necessarily acknowledged to the guest: there
the oracle checks the disk's own contract (`DISK_CACHE`), and what the
guest was promised is judged by the workload's checkers and by
`qemu-img check` (`harness.workloads.qemu_img`), which runs on the host on
the image as the cut left it.

A host power cut freezes the powercut disk (SIGSTOP) at the instant QEMU
(and qemu-storage-daemon) is killed, so requests in flight stop half-done,
then applies the offline cut to the journal. The reboot serves the same
file with no fault drivers through the same QEMU graph, so QEMU replays (or
repairs) the qcow2 metadata itself. The image for qcow2 is made on the host:
mkfs on a raw file, `qemu-img convert` into qcow2 (`create_qcow2`).
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.block.cache import cache_settings
from harness.block.options import format_dotted
from harness.crash.session import CrashSession, DiskSession, fault_blockdev
from harness.durability.contract import (
    CacheMode,
)
from harness.errors import ConfigError, MachineError, PowercutError
from harness.guest.ssh import SSHSession
from harness.scenario.cells import Cell
from harness.scenario.model import DiskSpec, ImageFormat
from harness.vm.backends import Backend, ProcessBackend
from harness.vm.daemons import QsdOptions, ServeOptions
from harness.vm.image import GuestImage
from harness.vm.spec import Accel, BlockdevDisk, Disk
from harness.workloads.base import DEVICE, QEMU_IMG_CHECK, Observation
from harness.workloads.qemu_img import check_image, create_qcow2

log = logging.getLogger(__name__)

# The powercut disk's own cache mode under QEMU: a disk with a volatile write cache that
# honours every flush and FUA and adds no page cache of its own (see the module docstring).
DISK_CACHE = CacheMode.NONE
EXPORT = "disk"
FORMAT_NODE = "vda0"  # QEMU's node the guest's device (or qsd's export) sits on
PROTOCOL_NODE = "proto0"

# The cut runner's request names (virtio-blk's) to the NBD export's.
_NBD_REQUESTS = {"OUT": "WRITE", "IN": "READ", "FLUSH": "FLUSH", "DISCARD": "TRIM"}


def qemu_graph(fmt: ImageFormat, mode: CacheMode, nbd: ServeOptions) -> tuple[dict[str, Any], ...]:
    """QEMU's `-blockdev` nodes for `mode` on the NBD export `nbd`: protocol, then format.

    The cache mode spelled out as libvirt does for `-drive cache=MODE`:
    `cache.direct` and `cache.no-flush` on both nodes, the write cache on the
    device (or qsd's export).
    """
    s = cache_settings(mode)
    cache = {"direct": s.direct, "no-flush": s.no_flush}
    protocol = {**nbd.nbd_blockdev(PROTOCOL_NODE), "cache": cache, "discard": "unmap"}
    top = {
        "driver": fmt.value,
        "node-name": FORMAT_NODE,
        "file": PROTOCOL_NODE,
        "cache": cache,
        "discard": "unmap",
    }
    return protocol, top


def qemu_blockdevs(fmt: ImageFormat, mode: CacheMode, nbd: ServeOptions) -> tuple[str, ...]:
    """`qemu_graph` as QEMU's `-blockdev` values (dotted)."""
    return tuple(format_dotted(node) for node in qemu_graph(fmt, mode, nbd))


class QemuSession(DiskSession):
    """A guest on QEMU's block graph over the powercut NBD disk; the `CellSession` interface."""

    def __init__(
        self,
        directory: Path,
        image: GuestImage,
        mode: CacheMode,
        spec: DiskSpec,
        *,
        host_checkers: Sequence[str] = (),
        accel: Accel | None = None,
        memory_mib: int = 512,
        name: str = "cell",
    ) -> None:
        self.backend_kind = spec.backend
        self.format = spec.format
        if self.backend_kind is Backend.POWERCUT:
            raise ConfigError("QemuSession runs QEMU's block layer; use CrashSession for powercut")
        self.host_checkers = tuple(host_checkers)
        self.qcow2 = self.format is ImageFormat.QCOW2
        self._prepare(directory, image, mode, spec, "disk.qcow2" if self.qcow2 else "disk.img")
        try:
            t0 = time.monotonic()
            self._make_disk(self.directory / "mkfs.raw" if self.qcow2 else self.disk)
            if self.qcow2:
                self.disk.unlink(missing_ok=True)
                options = tuple((k, _option_text(v)) for k, v in spec.format_options)
                create_qcow2(self.directory / "mkfs.raw", self.disk, options)
            self.make_seconds = time.monotonic() - t0
            self.settings = cache_settings(self.mode)
            self.nbd = self._nbd(faulty=True)
            self.graph = qemu_graph(self.format, self.mode, self.nbd.options)
            self.qsd: ProcessBackend[QsdOptions] | None = None
            disk: Disk
            if self.backend_kind is Backend.QSD:
                self.qsd = self._qsd()
                disk = self.qsd.disk()
            else:
                blockdevs = tuple(format_dotted(node) for node in self.graph)
                disk = BlockdevDisk(blockdevs, FORMAT_NODE, self.settings.write_cache)
            self._start_machine(disk, accel, memory_mib, name)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise

    @classmethod
    def for_cell(cls, cell: Cell) -> Any:
        """This class with the host-side checks `cell` asks for (its disk says the rest)."""
        return functools.partial(cls, host_checkers=cell.checkers)

    # -- the processes ---------------------------------------------------------------

    def _nbd(self, *, faulty: bool) -> ProcessBackend[ServeOptions]:
        if faulty:
            graph = fault_blockdev(self.disk, self.journal, self.write_log, self.blkdebug_config)
        else:  # after the cut: the same file, no fault drivers
            graph = format_dotted(
                {"driver": "raw", "file": {"driver": "file", "filename": str(self.disk)}}
            )
        options = ServeOptions(
            blockdev=graph, nbd=str(self.rundir / "nbd.sock"), nbd_export=EXPORT, cache=DISK_CACHE
        )
        log_path = self.directory / ("backend.log" if faulty else "backend-plain.log")
        return ProcessBackend(options, name="nbd", log_path=log_path)

    def _qsd(self) -> ProcessBackend[QsdOptions]:
        """qemu-storage-daemon exporting QEMU's graph on the NBD disk as vhost-user-blk."""
        options = QsdOptions(
            self.graph,
            FORMAT_NODE,
            self.rundir / "qsd0.sock",
            write_cache=self.settings.write_cache,
        )
        log_path = self.directory / "qemu-storage-daemon.log"
        return ProcessBackend(options, name="qsd0", log_path=log_path, reconnect=0)

    def _freeze_host(self) -> None:
        # The disk stops mid-request first, so neither QEMU nor qsd can get anything more
        # made durable while they are being killed.
        self.nbd.freeze()
        if self.qsd is not None:
            self.qsd.freeze()

    def _kill_host(self) -> None:
        if self.qsd is not None:
            self.qsd.kill()
            self.qsd.stop()
        self.nbd.kill()
        self.nbd.stop()

    def _stop_host(self) -> None:
        try:
            if self.qsd is not None:
                self.qsd.stop()
        finally:
            self.nbd.stop()

    @property
    def backend_log(self) -> Path:
        return self.directory / "backend.log"

    def artifacts(self) -> dict[str, Path]:
        out = {
            "console_log": self.console_log,
            "qemu_log": self.directory / "qemu.log",
            "backend_log": self.backend_log,
            "backend_plain_log": self.directory / "backend-plain.log",
            "qsd_log": self.directory / "qemu-storage-daemon.log",
            "write_log": self.write_log,
            "journal": self.journal,
        }
        for name in ("cut.json", "oracle.json", "blkdebug.json", "qemu-img-check.log"):
            out[name.replace(".", "_").replace("-", "_")] = self.directory / name
        return {k: v for k, v in out.items() if v.exists()}

    # -- lifecycle ---------------------------------------------------------------------

    def boot(self, timeout: float = 120.0) -> SSHSession:
        """Start the NBD disk (and qsd) if they are not serving, and boot the guest."""
        if not self.nbd.running:
            self.nbd.start()
        if self.qsd is not None and not self.qsd.running:
            self.qsd.start()
        ssh = self.machine.boot(timeout)
        if self.qsd is not None:
            # qsd 7.2's vhost-user-blk export shows the guest no write cache whatever its
            # `writethrough` (docs: facts.md), so the guest would never flush a write-back
            # export. The guest's cache_type write reaches qsd as VHOST_USER_SET_CONFIG and
            # sets its BlockBackend's write cache: both sides then agree on the mode.
            name = DEVICE.removeprefix("/dev/")
            wanted = "write back" if self.settings.write_cache else "write through"
            ssh.run(f"echo '{wanted}' > /sys/block/{name}/cache_type", timeout=60, check=True)
        return ssh

    def stats(self) -> dict[str, Any]:
        return self.nbd.stats()

    def requests(self, kind: str) -> int:
        """Requests of `kind` (OUT, FLUSH, ...) that reached the powercut disk; -1 if unknown.

        These are QEMU's requests to the disk, not the guest's to QEMU: with
        qcow2 they include its metadata writes and the flushes it adds.
        """
        try:
            counts = self.stats().get("nbd", {}).get("requests", {})
            return int(counts.get(_NBD_REQUESTS.get(kind, kind), 0))
        except (OSError, ValueError, PowercutError):
            return -1

    def crash_backend(self, timeout: float = 60.0) -> float:
        raise ConfigError(
            f"a backend crash is not supported with backend = {self.backend_kind.value!r}: "
            "restarting the NBD disk under QEMU's NBD client (which reruns paused requests "
            "only with reconnect-delay) is not built"
        )

    @property
    def oracle_mode(self) -> CacheMode:
        """The cache mode whose contract holds at the powercut disk (see the module docstring)."""
        return self.mode if self.format is ImageFormat.RAW else DISK_CACHE

    def host_checks(self) -> dict[str, Observation]:
        """The host-side checkers this cell asked for, on the image as the cut left it."""
        found: dict[str, Observation] = {}
        if self.qcow2 and QEMU_IMG_CHECK in self.host_checkers:
            with open(self.directory / "qemu-img-check.log", "a") as out:
                obs = check_image(self.disk, self.directory / "repair-scratch.qcow2", out)
            log.info("qemu-img check: %s", obs.summary())
            found[QEMU_IMG_CHECK] = obs
        return found

    def reboot(self, timeout: float = 120.0) -> SSHSession:
        """Serve the same file with no fault drivers, through the same QEMU graph, and boot."""
        if self.machine.running:
            raise MachineError("the guest is still running: power_cut() or shutdown() first")
        self._stop_host()
        self.nbd = self._nbd(faulty=False)  # the same socket path: the machine's graph stands
        if self.qsd is not None:
            self.qsd = self._qsd()
        return self.boot(timeout)


def _option_text(value: object) -> str:
    """A format option as `qemu-img -o` spells it (booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# Which crash session drives a cell, by the backend that serves its disk.
SESSIONS: dict[Backend, type[DiskSession]] = {
    Backend.POWERCUT: CrashSession,
    Backend.QEMU: QemuSession,
    Backend.QSD: QemuSession,
}


def session_for(cell: Cell) -> Any:
    """The session factory (taking `CrashSession`'s arguments) for `cell`'s backend."""
    return SESSIONS[cell.disk.backend].for_cell(cell)


__all__ = ["DISK_CACHE", "SESSIONS", "QemuSession", "qemu_blockdevs", "qemu_graph", "session_for"]
