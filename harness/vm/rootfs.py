"""The guest's root disk: a real Debian root made by mmdebstrap, packed read-only.

Why a disk and not a bigger initramfs: the kernel unpacks an initramfs in
full at every boot, and under TCG that costs about as much as the bytes it
holds; a read-only erofs disk costs only the blocks the guest reads, so a
root with PostgreSQL boots about as fast as one with only fio (measured:
benchmarks/results/boot-*.json; images/README.md has the figures).

The root is a whole Debian system (dpkg's status, maintainer scripts run), so
any package with its dependency closure works as it does on Debian; the guest
mounts it under an overlay on tmpfs, so /etc, /var, /tmp, /run and /home are
writable and daemons start.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from harness.errors import ImageBuildError

log = logging.getLogger(__name__)

SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
APT_LISTS = Path("/var/lib/apt/lists")
ROOT_SERIAL = "powercut-root"
FORMATS = ("erofs", "erofs-lz4", "squashfs")
# Bump when mmdebstrap_argv changes what a root holds for the same packages.
ROOTFS_VERSION = 1

Runner = Callable[[list[str], str], str]


def apt_sources() -> Path:
    """The host's apt sources, which the guest root is made from (the same archive)."""
    if SOURCES.is_file():
        return SOURCES
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        return legacy
    raise ImageBuildError(
        f"no apt sources at {SOURCES} or {legacy}; the guest root is made from the "
        "archive the host's apt uses"
    )


def mmdebstrap_argv(
    suite: str,
    variant: str,
    packages: Iterable[str],
    target: Path,
    debs: Path,
    sources: Path,
) -> list[str]:
    """The mmdebstrap command line that makes the root in `target` (a directory)."""
    return [
        "mmdebstrap",
        # root mode: we are root, and maintainer scripts (postgresql's initdb,
        # say) run in a real chroot with /proc, /sys and /dev mounted; mmdebstrap
        # keeps daemons from starting there (policy-rc.d, start-stop-daemon).
        "--mode=root",
        # essential: only Essential: yes packages plus --include, no apt or init.
        f"--variant={variant}",
        "--format=directory",
        # No `apt-get update` inside: the host's lists are copied in (the setup
        # hook below), so the versions installed are exactly the ones the
        # cache key was computed from, and nothing is fetched but .debs.
        "--skip=update",
        # Keep downloaded .debs in /var/cache/apt/archives so sync-out can save
        # them for the next build (another package set shares most of them).
        "--skip=essential/unlink",
        "--quiet",
        f"--include={','.join(packages)}",
        "--aptopt=APT::Install-Recommends false",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        '--setup-hook=mkdir -p "$1"/var/lib/apt/lists "$1"/var/cache/apt/archives',
        f"--setup-hook=for f in {APT_LISTS}/*; do case ${{f##*/}} in lock|partial|auxfiles) ;; "
        f'*) [ -f "$f" ] && cp "$f" "$1"/var/lib/apt/lists/ ;; esac; done',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        # The package cache is kept outside; the root does not carry it.
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        suite,
        str(target),
        str(sources),
    ]


def make_root(
    suite: str,
    variant: str,
    packages: Iterable[str],
    target: Path,
    debs: Path,
    log_path: Path,
) -> None:
    """Run mmdebstrap into `target`; its output goes to `log_path`."""
    debs.mkdir(parents=True, exist_ok=True)
    argv = mmdebstrap_argv(suite, variant, packages, target, debs, apt_sources())
    try:
        with open(log_path, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError("mmdebstrap is not installed; run ci/bootstrap") from exc
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise ImageBuildError(
            f"mmdebstrap could not make the guest root (exit {proc.returncode}); "
            f"log {log_path}:\n{tail}"
        )


def installed_versions(root: Path) -> dict[str, str]:
    """name → version of every package dpkg says is installed in `root`."""
    status = root / "var" / "lib" / "dpkg" / "status"
    versions: dict[str, str] = {}
    name = version = ""
    installed = False
    for line in [*status.read_text(errors="replace").splitlines(), ""]:
        if not line:
            if name and installed:
                versions[name] = version
            name, version, installed = "", "", False
        elif line.startswith("Package: "):
            name = line[9:].strip()
        elif line.startswith("Version: "):
            version = line[9:].strip()
        elif line.startswith("Status: "):
            installed = line.endswith(" installed")
    return versions


def mkfs_argv(fmt: str, root: Path, image: Path) -> list[str]:
    """The command that packs `root` into a read-only image of format `fmt`."""
    if fmt == "erofs":
        return ["mkfs.erofs", "--quiet", "-T0", str(image), str(root)]
    if fmt == "erofs-lz4":
        return ["mkfs.erofs", "--quiet", "-T0", "-zlz4hc", str(image), str(root)]
    if fmt == "squashfs":
        return [
            "mksquashfs",
            str(root),
            str(image),
            "-noappend",
            "-quiet",
            "-no-progress",
            "-comp",
            "lz4",
        ]
    raise ImageBuildError(f"unknown root format {fmt!r}; [root].format is one of {FORMATS}")


def pack_root(fmt: str, root: Path, image: Path) -> None:
    argv = mkfs_argv(fmt, root, image)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} is not installed; run ci/bootstrap (erofs-utils, squashfs-tools)"
        ) from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )


def fs_type(fmt: str) -> str:
    """The guest's `mount -t` name of a root format."""
    return "squashfs" if fmt == "squashfs" else "erofs"


def copy_tree(src: Path, dst: Path) -> None:
    """Copy `src` over `dst` keeping modes and symlinks (guest-files/)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(stat.S_IMODE(path.stat().st_mode))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()
            shutil.copyfile(path, target)
            target.chmod(stat.S_IMODE(path.stat().st_mode))


def add_missing_applets(root: Path, busybox: str, applets: Iterable[str]) -> list[str]:
    """Link busybox applets (full paths like /sbin/poweroff) the root has no program for.

    The guest has no init system, so `poweroff`, `ip` and friends come from
    busybox; a real program of the same name always wins.
    """
    added = []
    for applet in applets:
        name = applet.rsplit("/", 1)[-1]
        if any((root / d / name).exists() for d in ("usr/bin", "usr/sbin", "usr/local/bin")):
            continue
        rel = "usr/sbin" if "/sbin/" in applet else "usr/bin"
        link = root / rel / name
        if link.is_symlink():
            continue
        os.symlink(busybox, link)
        added.append(f"{rel}/{name}")
    return added


def set_root_shell(root: Path, shell: str = "/bin/sh") -> None:
    """root's login shell: dash, which starts faster than bash for every SSH command."""
    passwd = root / "etc" / "passwd"
    lines = []
    for line in passwd.read_text().splitlines():
        if line.startswith("root:"):
            parts = line.split(":")
            parts[-1] = shell
            line = ":".join(parts)
        lines.append(line)
    passwd.write_text("\n".join(lines) + "\n")
