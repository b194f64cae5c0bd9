"""QemuMachine: QEMU started directly, QMP through qemu.qmp."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.block.options import escape_value as q
from harness.errors import MachineError, PowercutError, ProcessError
from harness.proc import ManagedProcess
from harness.vm.accel import QEMU
from harness.vm.clock import kernel_cmdline
from harness.vm.machine import HOST, Machine, free_port
from harness.vm.spec import (
    ROOT_DISK_SERIAL,
    ROOT_DISK_SLOT,
    Accel,
    BlockdevDisk,
    FileDisk,
    MachineSpec,
    StreamNic,
    VhostUserDisk,
)

log = logging.getLogger(__name__)

# PCI slots: fixed, so /dev/vda is always the first disk of the spec.
_NET_SLOT = 3
_RNG_SLOT = 4
_FIRST_NIC_SLOT = 5  # the private network's NICs: 5, 6, 7
_FIRST_DISK_SLOT = 8
_PORT_ATTEMPTS = 5
# QEMU start to QMP greeting; well under a second unless a backend does not answer.
_QMP_TIMEOUT = 30.0


def qemu_argv(
    spec: MachineSpec, accel: Accel, ports: dict[int, int], workdir: Path, qemu: str = QEMU
) -> list[str]:
    """The QEMU command line for `spec`; also what `powercut vm --print` would show."""
    mem = f"{spec.memory_mib}M"
    argv = [
        qemu,
        "-name",
        f"{spec.name},debug-threads=on",
        "-accel",
        accel.value
        + (f",tb-size={spec.tcg_tb_mib}" if accel is Accel.TCG and spec.tcg_tb_mib else ""),
        # memfd + share=on: a vhost-user backend maps guest memory through the fds.
        "-object",
        f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-M",
        "pc,memory-backend=mem",
        "-cpu",
        spec.cpu_model or ("host" if accel is Accel.KVM else "qemu64"),
        "-smp",
        str(spec.cpus),
        "-m",
        mem,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initramfs),
        "-append",
        kernel_cmdline(spec.cmdline, accel),
        "-chardev",
        f"file,id=con,path={q(workdir / 'console.log')},append=on",
        "-serial",
        "chardev:con",
        "-qmp",
        f"unix:{q(workdir / 'qmp.sock')},server=on,wait=off",
        # A hardware RNG lets the guest's crng start without waiting for jitter entropy.
        "-device",
        f"virtio-rng-pci,addr={_RNG_SLOT:#x}",
    ]
    if spec.firmware is not None:
        argv += ["-bios", str(spec.firmware)]
    fwd = "".join(f",hostfwd=tcp:{HOST}:{host}-:{guest}" for guest, host in ports.items())
    restrict = ",restrict=on" if spec.isolated else ""
    argv += [
        "-netdev",
        f"user,id=net0{restrict}{fwd}",
        "-device",
        f"virtio-net-pci,netdev=net0,romfile=,addr={_NET_SLOT:#x}",
    ]
    argv += nic_arguments(spec.nics)
    for i, disk in enumerate(spec.disks):
        slot = f"addr={_FIRST_DISK_SLOT + i:#x}"
        if isinstance(disk, VhostUserDisk):
            argv += [
                "-chardev",
                f"socket,id=vu{i},path={q(disk.socket)},reconnect={disk.reconnect}",
                "-device",
                f"vhost-user-blk-pci,chardev=vu{i},num-queues={disk.num_queues},{slot}",
            ]
        elif isinstance(disk, FileDisk):
            ro = "on" if disk.read_only else "off"
            argv += [
                "-drive",
                f"file={q(disk.path)},if=none,id=disk{i},format={disk.format},"
                f"cache={disk.cache.value},readonly={ro},discard=unmap",
                "-device",
                f"virtio-blk-pci,drive=disk{i},{slot}",
            ]
        elif isinstance(disk, BlockdevDisk):
            for blockdev in disk.blockdevs:
                argv += ["-blockdev", blockdev]
            wce = "on" if disk.write_cache else "off"
            # werror=report: QEMU's default stops the VM on ENOSPC, which would hang a test.
            argv += [
                "-device",
                f"virtio-blk-pci,drive={disk.node},write-cache={wce},"
                f"werror=report,rerror=report,{slot}",
            ]
    if spec.root_disk is not None:
        argv += [
            "-drive",
            # Read-only and shared by every guest booted from the image.
            f"file={q(spec.root_disk)},if=none,id=rootdisk,format=raw,readonly=on,cache=writeback",
            "-device",
            f"virtio-blk-pci,drive=rootdisk,serial={ROOT_DISK_SERIAL},addr={ROOT_DISK_SLOT:#x}",
        ]
    return argv


def nic_arguments(nics: tuple[StreamNic, ...]) -> list[str]:
    """`-netdev stream` clients of the switch's ports, each under a virtio-net-pci device."""
    if len(nics) > _FIRST_DISK_SLOT - _FIRST_NIC_SLOT:
        raise MachineError(
            f"{len(nics)} private NICs do not fit before the disks' PCI slots; "
            f"use at most {_FIRST_DISK_SLOT - _FIRST_NIC_SLOT}"
        )
    argv: list[str] = []
    for i, nic in enumerate(nics, start=1):
        argv += [
            "-netdev",
            f"stream,id=net{i},server=off,addr.type=unix,addr.path={q(nic.socket)}",
            "-device",
            f"virtio-net-pci,netdev=net{i},mac={nic.mac},romfile=,"
            f"addr={_FIRST_NIC_SLOT + i - 1:#x}",
        ]
    return argv


class _Monitor(QEMUMonitorProtocol):
    """qemu.qmp's sync client, with a bounded connect.

    QEMU greets on QMP only after every device is realized, and a
    vhost-user-blk device whose backend never answers blocks that forever.
    """

    def connect_within(self, timeout: float) -> None:
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        # QEMU binds the socket (the path appears) a moment before it listens; a connect
        # in between is refused. Rare on an idle machine, common with cells in parallel.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sync(self._qmp.connect(self._address), max(0.1, deadline - time.monotonic()))
                return
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
            except QMPError as exc:
                if not isinstance(exc.__cause__, ConnectionRefusedError):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)


class QemuMachine(Machine):
    """A guest in a QEMU process this harness owns (PDEATHSIG, killed by PID)."""

    def __init__(
        self,
        spec: MachineSpec,
        *,
        workdir: Path | None = None,
        accel: Accel | None = None,
        keep: bool = False,
        qemu: str = QEMU,
    ) -> None:
        super().__init__(spec, workdir=workdir, accel=accel, keep=keep)
        self.qemu = qemu
        self._proc: ManagedProcess | None = None
        self._qmp: _Monitor | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def process(self) -> ManagedProcess | None:
        return self._proc

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    def logs(self) -> dict[str, Path]:
        return {**super().logs(), "qemu": self.qemu_log}

    @property
    def qmp(self) -> _Monitor:
        if self._qmp is None or not self.running:
            raise MachineError(f"machine {self.spec.name} is not running; no QMP")
        return self._qmp

    def _launch(self) -> None:
        if len(self.spec.disks) >= ROOT_DISK_SLOT - _FIRST_DISK_SLOT:
            raise MachineError(
                f"{len(self.spec.disks)} disks do not fit before the root disk's PCI slot; "
                f"use at most {ROOT_DISK_SLOT - _FIRST_DISK_SLOT - 1}"
            )
        if self.spec.root_disk is not None and not self.spec.root_disk.is_file():
            raise MachineError(
                f"the image's root disk {self.spec.root_disk} is missing; "
                "rebuild it with `powercut image build --force`"
            )
        for nic in self.spec.nics:
            if not nic.socket.exists():
                raise MachineError(
                    f"no switch port at {nic.socket}; start the private network's switch "
                    "(harness.vm.network.PrivateNetwork.start_switch) first"
                )
        for disk in self.spec.disks:
            if isinstance(disk, VhostUserDisk) and not disk.socket.exists():
                raise MachineError(
                    f"no vhost-user backend socket at {disk.socket}; start the backend "
                    "(powercut serve ... --socket PATH, or qemu-storage-daemon) first"
                )
        accel = self.accel
        sock = self.workdir / "qmp.sock"
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            ports = {g: free_port() for g in self.spec.forwards}
            sock.unlink(missing_ok=True)
            proc = ManagedProcess(
                qemu_argv(self.spec, accel, ports, self.workdir, self.qemu),
                name=f"qemu-{self.spec.name}",
                log_path=self.qemu_log,
                stop_signal=signal.SIGTERM,
                stop_timeout=5.0,
            )
            proc.start()
            qmp: _Monitor | None = None
            try:
                proc.wait_for(sock.exists, 30, "QEMU's QMP socket")
                qmp = _Monitor(str(sock), nickname=self.spec.name)
                qmp.settimeout(30)
                qmp.connect_within(_QMP_TIMEOUT)
                # Answered only after every backend (netdev, chardevs, disks) is up.
                qmp.cmd("query-status")
            except (PowercutError, QMPError, OSError, EOFError) as exc:
                tail = proc.log_tail(10)
                if qmp is not None:
                    with contextlib.suppress(QMPError, OSError, EOFError):
                        qmp.close()
                proc.stop()
                if "host forwarding" in tail and attempt < _PORT_ATTEMPTS:
                    log.info("a forwarded port was taken before QEMU bound it; retrying")
                    continue
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    reason = (
                        f"no QMP greeting within {_QMP_TIMEOUT:.0f}s; does every "
                        "vhost-user backend answer on its socket?"
                    )
                raise MachineError(
                    f"QEMU did not start ({reason}); log {self.qemu_log}:\n{tail}"
                ) from exc
            except BaseException:
                # Ctrl-C while QEMU starts: nothing else knows of this process yet, so it
                # would outlive the run until its parent-death signal came.
                if qmp is not None:
                    with contextlib.suppress(QMPError, OSError, EOFError):
                        qmp.close()
                proc.kill()
                raise
            self._proc, self._qmp, self.ports = proc, qmp, ports
            log.info(
                "started %s (pid %d, %s), ssh on %s:%d",
                self.spec.name,
                proc.pid,
                accel.value,
                HOST,
                ports.get(self.spec.ssh_port, 0),
            )
            return

    def _kill(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError, RuntimeError):
                self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            self._proc.kill()

    def _wait_stopped(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
        except PowercutError:
            return False
        return True

    def quit(self) -> None:
        """Ask QEMU to exit through QMP (the guest is not told)."""
        if self.running:
            with contextlib.suppress(QMPError, OSError, EOFError, ProcessError):
                self.qmp.cmd("quit")
        self._kill()
