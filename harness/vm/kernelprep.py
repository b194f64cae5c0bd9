"""The kernel as an image build takes it: fetched, read, copied, its modules indexed.

Debian's kernel (`[kernel].package`) is fetched as a .deb and unpacked; your
own (`kernel=PATH`, a bzImage or vmlinux, with `modules=PATH`, its
lib/modules/RELEASE tree) is taken as it is. Either is read by
`harness.vm.kernel` (release, config, the features the image records) and
copied into the image. A bzImage's payload is decompressed into an ELF booted
through its PVH entry, so no decompression runs in the emulated CPU. Its
modules tree is indexed with depmod wherever it sits, so `modules.dep` says
which modules the initramfs and the root need.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageBuildError
from harness.vm import kernel as kern
from harness.vm.recipe import Plan
from harness.vm.tools import Progress, run

log = logging.getLogger(__name__)


def fetch_deb(package: str, version: str, downloads: Path) -> Path:
    """A package's .deb, from the download cache or `apt-get download`."""
    downloads.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    deb = downloads / f"{package}_{quoted}_amd64.deb"
    if deb.exists():
        return deb
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        # apt's sandbox user must be able to write where it downloads.
        os.chmod(tmp, 0o777)
        run(
            ["apt-get", "download", "-q", f"{package}={version}"],
            f"downloading {package} {version} (check network and apt sources)",
            cwd=Path(tmp),
        )
        got = list(Path(tmp).glob("*.deb"))
        if not got:
            raise ImageBuildError(f"apt-get download {package}={version} produced no .deb")
        os.replace(got[0], deb)
    return deb


@dataclass(frozen=True)
class PreparedKernel:
    """The kernel as unpacked for a build: what to boot, its modules, its features."""

    boot_file: Path  # vmlinux (PVH ELF) or the bzImage
    bzimage: Path
    release: str
    moddir: Path | None  # lib/modules/RELEASE with modules.dep, or None
    features: dict[str, str]
    # The image's modules go in without their signatures (`module_bytes`): this
    # kernel, booted with the image's command line, loads unsigned modules.
    strip_signatures: bool = False

    def module_bytes(self, rel: str) -> bytes:
        """A module of `moddir` as the image holds it."""
        assert self.moddir is not None
        data = (self.moddir / rel).read_bytes()
        return kern.strip_module_signature(data) if self.strip_signatures else data


def kernel_cmdline(p: Plan) -> str:
    """The kernel command line the image records (the recipe's, and its package's extra)."""
    conf = p.recipe.data["kernel"]
    extra = conf.get("package_cmdline", "") if p.kernel_file is None else ""
    return f"{conf['cmdline']} {extra}".strip()


def prepare_kernel(p: Plan, work: Path, out: Path, cache: Path, say: Progress) -> PreparedKernel:
    """The plan's kernel, copied into `out` as it boots, with its modules tree indexed."""
    modules_path: Path | None
    if p.kernel_file is None:
        assert p.kernel_package is not None and p.kernel_version is not None
        say(f"fetching {p.kernel_package} {p.kernel_version}")
        deb = fetch_deb(p.kernel_package, p.kernel_version, cache / "downloads")
        kroot = work / "kernel"
        run(["dpkg-deb", "-x", str(deb), str(kroot)], f"unpacking {deb}")
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageBuildError(f"{deb} holds no boot/vmlinuz-*")
        kernel_path, modules_path = vmlinuz, kroot / "lib" / "modules" / vmlinuz.name[8:]
    else:
        kernel_path = p.kernel_file
        modules_path = p.modules_dir
    say("reading the kernel")
    info = kern.read_kernel(kernel_path)
    tree = kern.ModulesTree.read(modules_path) if modules_path is not None else None
    check = kern.check_kernel(info, tree, kern.BASE_NEEDS)
    if check.unknown:
        log.warning(
            "cannot check %s for %s before boot (no config, no modules tree); "
            "the guest's init reports what is missing",
            kernel_path,
            ", ".join(check.unknown),
        )
    features = {
        name: kern.feature_state(feature, info.config, tree)[0].value
        for name, feature in kern.FEATURES.items()
    }
    release = info.release or (tree.path.name if tree else "unknown")
    if info.kind == "elf":
        shutil.copyfile(kernel_path, out / "vmlinux")
        boot = bz = out / "vmlinux"
    else:
        shutil.copyfile(kernel_path, out / "bzImage")
        bz = out / "bzImage"
        boot = bz
        if info.pvh_elf is not None:
            boot = out / "vmlinux"
            boot.write_bytes(info.pvh_elf)
    moddir: Path | None = None
    if modules_path is not None:
        if p.kernel_file is None:
            moddir = modules_path
        else:
            moddir = work / "modroot" / "lib" / "modules" / release
            shutil.copytree(
                modules_path,
                moddir,
                symlinks=True,
                ignore=shutil.ignore_patterns("build", "source"),
            )
        _depmod(moddir, release)
    config = info.config
    if config is None and tree is not None and (tree.path / "build" / ".config").is_file():
        config = kern.parse_config((tree.path / "build" / ".config").read_text(errors="replace"))
    strip = kern.unsigned_modules_load(config, kernel_cmdline(p))
    return PreparedKernel(boot, bz, release, moddir, features, strip)


def _depmod(moddir: Path, release: str) -> None:
    """Run depmod on a lib/modules/RELEASE tree wherever it sits."""
    base = moddir.parent.parent.parent  # BASE/lib/modules/RELEASE
    if moddir.parent.name != "modules" or moddir.parent.parent.name != "lib":
        raise ImageBuildError(f"{moddir} is not laid out as BASE/lib/modules/RELEASE")
    run(["depmod", "-b", str(base), release], "running depmod on the kernel modules")


def install_modules(k: PreparedKernel, trees: list[str], root: Path) -> None:
    """Copy the kernel's chosen module subtrees into the root and index them."""
    if k.moddir is None:
        return
    dest = root / "usr" / "lib" / "modules" / k.release
    dest.mkdir(parents=True, exist_ok=True)
    dep = (k.moddir / "modules.dep").read_text()
    for rel in select_modules(dep, trees):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(k.module_bytes(rel))
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (k.moddir / meta).is_file():
            shutil.copyfile(k.moddir / meta, dest / meta)
    run(["depmod", "-b", str(root), k.release], "indexing the guest's modules (depmod)")


def select_modules(modules_dep: str, trees: list[str]) -> list[str]:
    """Module paths under any of `trees` (a directory or one .ko), with their dependencies."""
    chosen: set[str] = set()
    for dep in kern.parse_modules_dep(modules_dep).values():
        if any(dep.path == t or dep.path.startswith(t.rstrip("/") + "/") for t in trees):
            chosen.add(dep.path)
            chosen.update(dep.needs)
    return sorted(chosen)
