"""`powercut setup [--check] [--dry-run]`: the host an installed powercut needs.

    powercut setup --check     # what is there and what is missing; exit 1 if a required part is
    powercut setup             # as root: apt-get install what is missing; else: the command to run

What `ci/bootstrap` does for a checkout, for a powercut installed with pip
(a wheel has no ci/ directory). The lists below are the runtime part of
bootstrap's (a unit test keeps them in step); the Python environment is
pip's business, not this command's. KVM is reported, never required: the
harness falls back to TCG by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

NAME = "setup"
HELP = "install (or, with --check, check for) the Debian packages powercut needs on this host"


@dataclass(frozen=True)
class Part:
    package: str
    what: str
    required: bool
    probe: str  # a program on PATH, or an absolute file, that the package provides


PARTS: tuple[Part, ...] = (
    Part("qemu-system-x86", "QEMU, the guests' machine", True, "qemu-system-x86_64"),
    Part("qemu-system-data", "qboot, the guests' firmware", True, "/usr/share/qemu/qboot.rom"),
    Part("qemu-utils", "qemu-img, qemu-io", True, "qemu-img"),
    Part("fio", "the fio-verify workload (host-side client)", True, "fio"),
    Part("e2fsprogs", "mkfs.ext4, e2fsck, debugfs on the host", True, "mkfs.ext4"),
    Part("util-linux", "the host-side filesystem tools", True, "blkid"),
    Part("mmdebstrap", "the guest's Debian root", True, "mmdebstrap"),
    Part("erofs-utils", "the guest's read-only root disk", True, "mkfs.erofs"),
    Part("cpio", "the guest's initramfs tools", True, "cpio"),
    Part("xz-utils", "Debian's compressed kernel", True, "xz"),
    Part("zstd", "zstd-compressed kernels", True, "zstd"),
    Part("lz4", "LZ4-compressed kernels", True, "lz4"),
    Part("kmod", "the guest kernel's module lists", True, "depmod"),
    Part("dropbear-bin", "the guest's SSH host key", True, "dropbearkey"),
    Part("gcc", "the guest's helper programs (static)", True, "gcc"),
    Part(
        "libc6-dev", "static libc for the guest's helpers", True, "/usr/lib/x86_64-linux-gnu/libc.a"
    ),
    Part("binutils", "readelf, nm for the guest's libraries", True, "readelf"),
    Part("xfsprogs", "scenarios on xfs", False, "mkfs.xfs"),
    Part("btrfs-progs", "scenarios on btrfs", False, "mkfs.btrfs"),
    Part("f2fs-tools", "scenarios on f2fs", False, "mkfs.f2fs"),
    Part("squashfs-tools", "a squashfs guest root (benchmarks)", False, "mksquashfs"),
    Part("libvirt-daemon", "guests through libvirt (powercut vm --libvirt)", False, "libvirtd"),
    Part(
        "libvirt-daemon-driver-qemu",
        "libvirt's QEMU driver",
        False,
        "/usr/lib/libvirt/connection-driver/libvirt_driver_qemu.so",
    ),
    Part("libvirt-clients", "virsh", False, "virsh"),
    Part("strace", "the cache-mode syscall tests", False, "strace"),
)

Installed = Callable[[Sequence[str]], set[str]]


def dpkg_installed(packages: Sequence[str]) -> set[str]:
    """The packages dpkg says are installed; without dpkg, those whose probe is present."""
    if shutil.which("dpkg-query") is None:
        by_name = {p.package: p for p in PARTS}
        return {name for name in packages if name in by_name and _probe(by_name[name].probe)}
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.endswith("install ok installed")
    }


def _probe(probe: str) -> bool:
    return Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None


def missing(parts: Iterable[Part], installed: Installed) -> list[Part]:
    parts = list(parts)
    have = installed([p.package for p in parts])
    return [p for p in parts if p.package not in have]


def kvm_status() -> tuple[str, str]:
    """(short status, detail): /dev/kvm's access and the cached probe's verdict, if any."""
    if not os.path.exists("/dev/kvm"):
        return "no", "/dev/kvm is missing: guests run under TCG (slower, works)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no", "/dev/kvm is not accessible to this user: guests run under TCG"
    from harness.vm.image import cache_root

    try:
        import json

        data = json.loads((cache_root() / "accel.json").read_text())
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        if data.get("boot_id") == boot:
            if data.get("accel") == "kvm":
                return "yes", "/dev/kvm works (the guest kernel booted under it)"
            return "no", "/dev/kvm opens, but a guest kernel hung under it: TCG (nested KVM?)"
    except (OSError, ValueError):
        pass
    return "maybe", "/dev/kvm is accessible; the first run probes whether guests boot under it"


def install_command(parts: Sequence[Part]) -> list[str]:
    return [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *[p.package for p in parts],
    ]


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true", help="only say what is there and what is missing"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the apt-get commands instead of running them"
    )


def check(console: Console, installed: Installed = dpkg_installed) -> int:
    have = installed([p.package for p in PARTS])
    table = Table(title="powercut: this host", show_lines=False)
    for column in ("part", "status", "package", "needed for"):
        table.add_column(column)
    status, detail = kvm_status()
    table.add_row("KVM", status, "(the kernel)", detail)
    for part in PARTS:
        ok = part.package in have
        state = "ok" if ok else ("MISSING" if part.required else "missing (optional)")
        table.add_row(part.probe.rsplit("/", 1)[-1], state, part.package, part.what)
    console.print(table)
    lacking = [p for p in PARTS if p.package not in have]
    required = [p for p in lacking if p.required]
    if lacking:
        console.print(
            f"missing: {' '.join(p.package for p in lacking)}; `powercut setup` installs them",
            markup=False,
        )
    if required:
        console.print(f"{len(required)} required packages are missing", style="bold red")
        return 1
    console.print("powercut can run here" + ("" if status == "yes" else " (under TCG)"))
    return 0


def install(
    console: Console,
    *,
    dry_run: bool = False,
    installed: Installed = dpkg_installed,
    euid: Callable[[], int] = os.geteuid,
    runner: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run,
) -> int:
    lacking = missing(PARTS, installed)
    if not lacking:
        console.print("powercut setup: every package powercut needs is installed")
        return 0
    command = install_command(lacking)
    if euid() != 0 and not dry_run:
        console.print(
            "powercut setup: these Debian packages are missing, and installing them needs root:",
            markup=False,
        )
        for part in lacking:
            console.print(f"  {part.package:28} {part.what}", markup=False, highlight=False)
        console.print("run:", markup=False)
        console.print(f"  sudo apt-get update && sudo {' '.join(command)}", markup=False)
        return 1
    steps = [["apt-get", "update", "-q"], command]
    if dry_run:
        for step in steps:
            console.print(" ".join(step), markup=False, highlight=False)
        return 0
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in steps:
        console.print(f"powercut setup: {' '.join(step)}", markup=False, highlight=False)
        done = runner(step, env=env, check=False)
        if done.returncode != 0:
            console.print(f"powercut setup: {step[0]} {step[1]} failed ({done.returncode})")
            return 1
    still = missing(PARTS, installed)
    if still:
        console.print(f"powercut setup: still missing: {' '.join(p.package for p in still)}")
        return 1
    console.print("powercut setup: done")
    return 0


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.check:
        return check(console)
    return install(console, dry_run=args.dry_run)
