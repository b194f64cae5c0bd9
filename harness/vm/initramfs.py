"""The guest's small initramfs: static busybox, images/init, the modules that reach the root.

The kernel unpacks an initramfs in full at every boot, and under TCG that
costs about as much as the bytes it holds, so it holds only what stage 1
(`images/init`) needs to find and mount the read-only root disk: busybox,
the handful of modules in `[kernel].modules` (with what they depend on, in
load order, from modules.dep) and the root's filesystem type. The tree is a
merged-/usr layout; the archive is newc cpio (`harness.vm.cpio`).
"""

from __future__ import annotations

import stat
from pathlib import Path

from harness.errors import ImageBuildError
from harness.vm import kernel as kern
from harness.vm.cpio import CpioEntry, CpioWriter
from harness.vm.kernelprep import PreparedKernel
from harness.vm.recipe import Plan
from harness.vm.tools import run

_DIR = stat.S_IFDIR | 0o755
_FILE = stat.S_IFREG | 0o644
_EXE = stat.S_IFREG | 0o755
_LINK = stat.S_IFLNK | 0o777


def guest_path(host_path: str) -> str:
    """Where a file goes in the initramfs: a merged-/usr layout, relative to the root."""
    p = host_path.lstrip("/")
    for top in ("bin/", "sbin/", "lib/", "lib64/"):
        if p.startswith(top):
            return "usr/" + p
    return p


def module_load_order(modules_dep: str, builtin: str, wanted: list[str]) -> list[str]:
    """Module paths (relative to the modules dir) to insmod, dependencies first."""
    deps = kern.parse_modules_dep(modules_dep)
    builtins = kern.parse_modules_builtin(builtin)
    order: list[str] = []
    for mod in wanted:
        m = kern.module_name(mod)
        if m in builtins:
            continue
        if m not in deps:
            raise ImageBuildError(
                f"kernel module {mod} is neither built in nor in modules.dep; "
                "fix [kernel].modules in images/recipe.toml"
            )
        dep = deps[m]
        # modules.dep lists the full closure, deepest dependency last.
        for p in [*reversed(dep.needs), dep.path]:
            if p not in order:
                order.append(p)
    return order


class InitramfsTree:
    """The initramfs tree being assembled; parents are created on demand."""

    def __init__(self) -> None:
        self.entries: dict[str, CpioEntry] = {}

    def _parents(self, name: str) -> None:
        if name.split("/")[0] in ("bin", "sbin", "lib", "lib64") and "/" in name:
            raise ImageBuildError(f"guest path {name} goes through a /usr symlink; use usr/...")
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.entries[d] = CpioEntry(d, _DIR)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        self.entries[name] = CpioEntry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = _FILE) -> None:
        self._parents(name)
        self.entries[name] = CpioEntry(name, mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self.entries[name] = CpioEntry(name, _LINK, target.encode())

    def device(self, name: str, char: bool, major: int, minor: int) -> None:
        self._parents(name)
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        self.entries[name] = CpioEntry(name, kind | 0o600, b"", major, minor)

    def write(self, path: Path) -> None:
        with open(path, "wb") as out:
            writer = CpioWriter(out)
            for name in sorted(self.entries):
                writer.add(self.entries[name])
            writer.close()


def build_initramfs(p: Plan, k: PreparedKernel, work: Path, out: Path, fs_type: str) -> list[str]:
    """The small initramfs: static busybox, images/init, the modules that reach the root."""
    ir = InitramfsTree()
    for top in ("usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc"):
        ir.dir(top)
    for top in ("bin", "sbin", "lib", "lib64"):
        ir.symlink(top, f"usr/{top}")
    ir.device("dev/console", True, 5, 1)
    ir.device("dev/null", True, 1, 3)
    busybox = work / "root" / "usr" / "bin" / "busybox"
    ir.file("usr/bin/busybox", busybox.read_bytes(), _EXE)
    applets = run([str(busybox), "--list-full"], "listing busybox applets")
    for applet in applets.split():
        g = guest_path("/" + applet)
        if g not in ir.entries:
            ir.symlink(g, "/usr/bin/busybox")
    names: list[str] = []
    if k.moddir is not None:
        order = module_load_order(
            (k.moddir / "modules.dep").read_text(),
            (k.moddir / "modules.builtin").read_text()
            if (k.moddir / "modules.builtin").is_file()
            else "",
            [*p.recipe.data["kernel"]["modules"], *([fs_type] if fs_type != "erofs" else [])],
        )
        for rel in order:
            name = Path(rel).name
            ir.file(f"usr/lib/modules/{name}", k.module_bytes(rel))
            names.append(name)
    ir.file("etc/modules.order", ("\n".join(names) + "\n").encode() if names else b"")
    ir.file("etc/root-fstype", f"{fs_type}\n".encode())
    ir.file("init", (p.recipe.directory / "init").read_bytes(), _EXE)
    ir.write(out / "initramfs.cpio")
    return names
