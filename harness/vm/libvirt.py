"""LibvirtMachine: the same MachineSpec as a transient libvirt domain.

The domain XML uses `<disk type='vhostuser'>` for vhost-user disks, memfd
shared memory backing (so the backend can map guest memory), and
`<domain type='qemu'>` under TCG. libvirt 9.0 ignores `<portForward>` on a
user-mode `<interface>`, so the network is passed through
`<qemu:commandline>` with explicit hostfwd rules. Transient domains vanish
when destroyed, so nothing is left defined on the host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import libvirt

from harness.errors import MachineError
from harness.vm.accel import parse_accel
from harness.vm.clock import kernel_cmdline
from harness.vm.libvirtd import ensure_libvirtd
from harness.vm.machine import HOST, Machine, free_port
from harness.vm.spec import (
    ROOT_DISK_SERIAL,
    ROOT_DISK_SLOT,
    Accel,
    FileDisk,
    MachineSpec,
    VhostUserDisk,
)

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_URI = "qemu:///system"
_PORT_ATTEMPTS = 5

# libvirt prints every error to stderr by default; we raise them instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _is_local(uri: str) -> bool:
    return uri.startswith("qemu:///")


def domain_xml(
    spec: MachineSpec, name: str, accel: Accel, ports: dict[int, int], console: Path
) -> str:
    """libvirt domain XML for `spec`."""
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type="kvm" if accel is Accel.KVM else "qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    mb = ET.SubElement(dom, "memoryBacking")
    ET.SubElement(mb, "source", type="memfd")
    ET.SubElement(mb, "access", mode="shared")
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.firmware is not None:
        ET.SubElement(os_, "loader", readonly="yes", type="rom").text = str(spec.firmware)
    ET.SubElement(os_, "kernel").text = str(spec.kernel)
    ET.SubElement(os_, "initrd").text = str(spec.initramfs)
    ET.SubElement(os_, "cmdline").text = kernel_cmdline(spec.cmdline, accel)
    # Without <acpi/> libvirt passes -no-acpi, and `poweroff` in the guest only halts it.
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    if spec.cpu_model:
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
        ET.SubElement(cpu, "model", fallback="forbid").text = spec.cpu_model
    elif accel is Accel.KVM:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    # Under TCG without a model, libvirt leaves QEMU's default: qemu64.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    if spec.nics or spec.isolated:
        raise MachineError(
            "a libvirt machine has no private network between guests (MachineSpec.nics); "
            "boot cluster nodes with QemuMachine"
        )
    dev = ET.SubElement(dom, "devices")
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console), append="on")
    ET.SubElement(serial, "target", port="0")
    for i, disk in enumerate(spec.disks):
        target = "vd" + "abcdefghijklmnopqrstuvwxyz"[i]
        if isinstance(disk, VhostUserDisk):
            d = ET.SubElement(dev, "disk", type="vhostuser", device="disk")
            ET.SubElement(d, "driver", name="qemu", type="raw", queues=str(disk.num_queues))
            src = ET.SubElement(d, "source", type="unix", path=str(disk.socket))
            if disk.reconnect:
                ET.SubElement(src, "reconnect", enabled="yes", timeout=str(disk.reconnect))
        elif isinstance(disk, FileDisk):
            d = ET.SubElement(dev, "disk", type="file", device="disk")
            ET.SubElement(
                d, "driver", name="qemu", type=disk.format, cache=disk.cache.value, discard="unmap"
            )
            ET.SubElement(d, "source", file=str(disk.path))
            if disk.read_only:
                ET.SubElement(d, "readonly")
        else:
            raise MachineError(
                f"a libvirt machine cannot attach {type(disk).__name__} (a raw -blockdev "
                "graph); boot it with QemuMachine"
            )
        ET.SubElement(d, "target", dev=target, bus="virtio")
    if spec.root_disk is not None:
        # Last, at the slot QemuMachine uses too: the disks under test keep vda, vdb, ...
        d = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type="raw", cache="writeback")
        ET.SubElement(d, "source", file=str(spec.root_disk))
        ET.SubElement(
            d, "target", dev="vd" + "abcdefghijklmnopqrstuvwxyz"[len(spec.disks)], bus="virtio"
        )
        ET.SubElement(d, "readonly")
        ET.SubElement(d, "serial").text = ROOT_DISK_SERIAL
        ET.SubElement(
            d,
            "address",
            type="pci",
            domain="0x0000",
            bus="0x00",
            slot=f"{ROOT_DISK_SLOT:#04x}",
            function="0x0",
        )
    rng = ET.SubElement(dev, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(dev, "memballoon", model="none")
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    fwd = "".join(f",hostfwd=tcp:{HOST}:{host}-:{guest}" for guest, host in ports.items())
    for arg in (
        "-netdev",
        f"user,id=pcnet0{fwd}",
        "-device",
        # libvirt places its own devices from slot 2 up; keep clear of them.
        "virtio-net-pci,netdev=pcnet0,romfile=,addr=0x1f",
    ):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode")


class LibvirtQmp:
    """QMP through libvirt's monitor passthrough, with the `cmd()` of qemu.qmp's legacy API."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self._domain = domain

    def cmd(self, name: str, **args: object) -> Any:
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(msg), 0))
        if "error" in reply:
            raise MachineError(f"QMP {name} failed: {reply['error'].get('desc', reply)}")
        return reply.get("return")


class LibvirtMachine(Machine):
    """A guest run by libvirt at `uri` (qemu:///system by default, qemu+ssh://... works too).

    For a remote URI the kernel, initramfs and disk paths must exist on that host.
    """

    def __init__(
        self,
        spec: MachineSpec,
        *,
        uri: str = DEFAULT_URI,
        workdir: Path | None = None,
        accel: Accel | None = None,
        keep: bool = False,
    ) -> None:
        super().__init__(spec, workdir=workdir, accel=accel, keep=keep)
        self.uri = uri
        self.domain_name = f"powercut-{spec.name}-{uuid.uuid4().hex[:8]}"
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self.xml_path = self.workdir / "domain.xml"

    def _resolve_accel(self) -> Accel:
        if _is_local(self.uri):
            return super()._resolve_accel()
        # The probe runs here, not on the remote host: trust $POWERCUT_ACCEL or KVM.
        return parse_accel(os.environ.get("POWERCUT_ACCEL")) or Accel.KVM

    def _connection(self) -> libvirt.virConnect:
        if self._conn is None:
            if self.uri == DEFAULT_URI:
                ensure_libvirtd()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise MachineError(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
        return self._conn

    @property
    def running(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False

    @property
    def qmp(self) -> LibvirtQmp:
        if self._dom is None or not self.running:
            raise MachineError(f"machine {self.spec.name} is not running; no QMP")
        return LibvirtQmp(self._dom)

    def logs(self) -> dict[str, Path]:
        logs = super().logs()
        qemu_log = Path("/var/log/libvirt/qemu") / f"{self.domain_name}.log"
        if _is_local(self.uri) and qemu_log.exists():
            logs["qemu (libvirt)"] = qemu_log
        return logs

    def _launch(self) -> None:
        for disk in self.spec.disks:
            if isinstance(disk, VhostUserDisk) and _is_local(self.uri) and not disk.socket.exists():
                raise MachineError(
                    f"no vhost-user backend socket at {disk.socket}; start the backend first"
                )
        conn = self._connection()
        accel = self.accel
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            ports = {g: free_port() for g in self.spec.forwards}
            xml = domain_xml(self.spec, self.domain_name, accel, ports, self.console_log.path)
            self.xml_path.write_text(xml)
            try:
                self._dom = conn.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                if "forwarding" in str(exc) and attempt < _PORT_ATTEMPTS:
                    continue
                raise MachineError(
                    f"libvirt could not start {self.domain_name}: {exc}; "
                    f"domain XML in {self.xml_path}"
                ) from exc
            self.ports = ports
            log.info(
                "started libvirt domain %s (%s), ssh on %s:%d",
                self.domain_name,
                accel.value,
                HOST,
                ports.get(self.spec.ssh_port, 0),
            )
            return

    def _qemu_pid(self) -> int | None:
        pidfile = Path("/run/libvirt/qemu") / f"{self.domain_name}.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _kill(self) -> None:
        if self._dom is None:
            return
        dom, self._dom = self._dom, None
        # A power cut is a SIGKILL: virDomainDestroy tries SIGTERM first, which lets
        # QEMU close its block devices cleanly. Locally we kill the domain's own QEMU.
        pid = self._qemu_pid() if _is_local(self.uri) else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if not dom.isActive():
                    return
                dom.destroy()
            except libvirt.libvirtError:
                return  # a transient domain is gone once it stops
            time.sleep(0.1)

    def _wait_stopped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        super().close()
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None
