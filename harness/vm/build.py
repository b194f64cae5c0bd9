"""Build the guest image from Debian packages, once per cache key.

The steps, in a temporary directory under `<cache>/images/`: the kernel
(`harness.vm.kernelprep`), the root — mmdebstrap's Debian root for the
package set (kept per set in `<cache>/roots/`), the kernel's module subtrees,
SSH keys, `images/rootinit`, guest-files, the compiled guest-src, library
stand-ins (`harness.vm.stubs`), packed read-only (`harness.vm.rootfs`) — then
the initramfs (`harness.vm.initramfs`) and the manifest. The result is
renamed into `<cache>/images/<hash>/` (the key: `harness.vm.recipe`).

Builds happen under a per-hash lock: concurrent builders of the same image
(pytest-xdist workers) wait for one another instead of racing, and the one
that waited finds the image built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import ImageBuildError
from harness.vm import rootfs
from harness.vm.image import GuestImage, cache_root
from harness.vm.initramfs import build_initramfs
from harness.vm.kernelprep import PreparedKernel, install_modules, kernel_cmdline, prepare_kernel
from harness.vm.recipe import BUILDER_VERSION, Plan, Recipe, plan
from harness.vm.stubs import stub_program
from harness.vm.tools import Progress, run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    """What `build` found or made, whether the cache had it, and how long that took."""

    image: GuestImage
    cache_hit: bool
    seconds: float


def _ssh_client_key(directory: Path) -> str:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    path = directory / "id_ed25519"
    path.write_bytes(private)
    path.chmod(0o600)
    (directory / "id_ed25519.pub").write_text(public + " powercut\n")
    return public


def _dropbear_host_key(root: Path, out: Path) -> str:
    """Generate the guest's host key with the guest's own dropbearkey (chroot)."""
    rel = "etc/dropbear/dropbear_ed25519_host_key"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).unlink(missing_ok=True)
    run(
        ["chroot", str(root), "dropbearkey", "-t", "ed25519", "-f", "/" + rel],
        "generating the guest SSH host key",
    )
    (root / rel).chmod(0o600)
    text = run(["chroot", str(root), "dropbearkey", "-y", "-f", "/" + rel], "reading it")
    line = next((ln for ln in text.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if line is None:
        raise ImageBuildError(f"dropbearkey printed no public key: {text!r}")
    public = " ".join(line.split()[:2])
    (out / "host_key.pub").write_text(public + "\n")
    return public


def _compile_guest_sources(src_dir: Path, work: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not src_dir.is_dir():
        return out
    for src in sorted(src_dir.glob("*.c")):
        exe = work / src.stem
        run(
            ["gcc", "-O2", "-static", "-Wall", "-o", str(exe), str(src)],
            f"compiling {src} (needs gcc and libc6-dev)",
        )
        out[f"usr/local/bin/{src.stem}"] = exe.read_bytes()
    return out


def _debian_root(p: Plan, cache: Path, target: Path) -> None:
    """mmdebstrap's root for the plan's package set, made once per set and copied.

    The bare Debian root depends only on the suite, variant and resolved
    package versions, not on the kernel or the recipe's other files, so it is
    kept in `<cache>/roots/<key>/`: another kernel, or an edit to init or
    guest-files, rebuilds the image in seconds instead of re-running mmdebstrap.
    """
    conf = p.recipe.root
    suite, variant = conf.get("suite", "bookworm"), conf.get("variant", "essential")
    key = hashlib.sha256(
        f"{rootfs.ROOTFS_VERSION} {suite} {variant} {p.resolution.digest()}".encode()
    ).hexdigest()[:16]
    roots = cache / "roots"
    stored = roots / key
    with _build_lock(roots, key):
        if not (stored / "var" / "lib" / "dpkg" / "status").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".make-{key}-", dir=roots))
            try:
                rootfs.make_root(
                    suite,
                    variant,
                    p.resolution.requested,
                    tmp / "root",
                    cache / "debs",
                    tmp / "mmdebstrap.log",
                )
                shutil.rmtree(stored, ignore_errors=True)
                os.rename(tmp / "root", stored)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    run(["cp", "-a", "--reflink=auto", str(stored), str(target)], "copying the Debian root")


def _build_root(
    p: Plan, k: PreparedKernel, work: Path, out: Path, cache: Path, say: Progress
) -> dict[str, Any]:
    recipe = p.recipe
    conf = recipe.root
    root = work / "root"
    say(f"making the Debian root ({len(p.resolution.requested)} packages, mmdebstrap)")
    _debian_root(p, cache, root)
    installed = rootfs.installed_versions(root)
    say("adding the harness's files to the root")
    install_modules(k, list(recipe.data["kernel"].get("module_trees", ["kernel"])), root)
    rootfs.set_root_shell(root)
    client_pub = _ssh_client_key(out)
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    (ssh_dir / "authorized_keys").write_text(client_pub + " powercut\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    host_pub = _dropbear_host_key(root, out)
    (root / "etc" / "hostname").write_text("powercut\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost powercut\n")
    profile = root / "etc" / "profile.d" / "powercut.sh"
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text("export PS1='powercut# '\n")
    init = root / "usr" / "lib" / "powercut" / "init"
    init.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe.directory / "rootinit", init)
    init.chmod(0o755)
    files_dir = recipe.directory / "guest-files"
    if files_dir.is_dir():
        rootfs.copy_tree(files_dir, root)
    for gpath, data in _compile_guest_sources(recipe.directory / "guest-src", work).items():
        (root / gpath).parent.mkdir(parents=True, exist_ok=True)
        (root / gpath).write_bytes(data)
        (root / gpath).chmod(0o755)
    stubbed = stub_program(recipe, root, work)
    applets = run(["chroot", str(root), "/usr/bin/busybox", "--list-full"], "listing applets")
    added = rootfs.add_missing_applets(root, "/usr/bin/busybox", applets.split())
    for name, target in recipe.data.get("links", {}).items():
        os.symlink(target, root / name)
    fmt = conf.get("format", "erofs")
    say(f"packing the root ({fmt})")
    rootfs.pack_root(fmt, root, out / "root.img")
    return {
        "installed": installed,
        "busybox_applets_added": len(added),
        "stubbed_libraries": stubbed,
        "host_public_key": host_pub,
        "format": fmt,
        "fs_type": rootfs.fs_type(fmt),
    }


@contextlib.contextmanager
def _build_lock(images: Path, key: str) -> Iterator[None]:
    """An exclusive lock per image hash: one builder at a time, the others wait."""
    images.mkdir(parents=True, exist_ok=True)
    with open(images / f".{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    recipe_dir: Path | None = None,
    cache: Path | None = None,
    *,
    packages: Iterable[str] = (),
    kernel: Path | None = None,
    modules: Path | None = None,
    needs: Iterable[str] = (),
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the image (or find it in the cache) and return where it is.

    `packages` go into the root beyond the recipe's; `kernel`/`modules` replace
    Debian's kernel; `needs` are kernel features (e.g. "xfs") checked before
    anything boots. Raises ConfigError for an unknown package, a missing kernel
    or a missing feature, naming the field.
    """
    t0 = time.monotonic()
    say = progress or (lambda msg: log.info("%s", msg))
    say("resolving the recipe and packages")
    recipe = Recipe.load(recipe_dir)
    cache = cache or cache_root()
    p = plan(recipe, cache, packages=packages, kernel=kernel, modules=modules)
    images = cache / "images"
    final = images / p.recipe_hash
    if not force and (final / "manifest.json").exists():
        image = GuestImage.load(final)
        image.check_features(needs)
        log.info("guest image %s is cached in %s", p.recipe_hash, final)
        return BuildResult(image, True, time.monotonic() - t0)
    with _build_lock(images, p.recipe_hash):
        if not force and (final / "manifest.json").exists():
            image = GuestImage.load(final)
            image.check_features(needs)
            return BuildResult(image, True, time.monotonic() - t0)
        _build(p, cache, final, force, say)
    image = GuestImage.load(final)
    image.check_features(needs)
    return BuildResult(image, False, time.monotonic() - t0)


def _build(p: Plan, cache: Path, final: Path, force: bool, say: Progress) -> None:
    images = final.parent
    work = Path(tempfile.mkdtemp(prefix=f".build-{p.recipe_hash}-", dir=images))
    try:
        out = work / "out"
        out.mkdir()
        k = prepare_kernel(p, work, out, cache, say)
        root_info = _build_root(p, k, work, out, cache, say)
        say("assembling the initramfs")
        modules = build_initramfs(p, k, work, out, root_info["fs_type"])
        guest = p.recipe.data.get("guest", {})
        manifest = {
            "recipe_hash": p.recipe_hash,
            "builder_version": BUILDER_VERSION,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {
                "kernel": k.boot_file.name,
                "bzimage": k.bzimage.name,
                "root_disk": "root.img",
            },
            "kernel": {
                "package": p.kernel_package,
                "version": p.kernel_version,
                "file": str(p.kernel_file) if p.kernel_file else None,
                "modules": str(p.modules_dir) if p.modules_dir else None,
                "release": k.release,
                "boot": "pvh" if k.boot_file.name == "vmlinux" else "bzImage",
            },
            "kernel_features": k.features,
            "extra_packages": list(p.extra),
            "requested_packages": list(p.resolution.requested),
            "packages": root_info["installed"],
            "root": {
                "format": root_info["format"],
                "fs_type": root_info["fs_type"],
                "bytes": (out / "root.img").stat().st_size,
                "busybox_applets_added": root_info["busybox_applets_added"],
                "stubbed_libraries": root_info["stubbed_libraries"],
            },
            "initramfs_modules": modules,
            "cmdline": kernel_cmdline(p),
            "ssh_port": guest.get("ssh_port", 22),
            "fio_server_port": guest.get("fio_server_port", 8765),
            "host_public_key": root_info["host_public_key"],
            "initramfs_bytes": (out / "initramfs.cpio").stat().st_size,
            "kernel_bytes": k.boot_file.stat().st_size,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        say("installing into the cache")
        if force and final.exists():
            shutil.rmtree(final)
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_image(
    packages: Iterable[str] = (),
    kernel: Path | None = None,
    modules: Path | None = None,
    *,
    needs: Iterable[str] = (),
    progress: Progress | None = None,
) -> GuestImage:
    """The image for the repository's recipe plus `packages` (and your kernel), built once."""
    return build(
        packages=packages, kernel=kernel, modules=modules, needs=needs, progress=progress
    ).image
