"""Build the guest image from Debian packages, cached by what it is made of.

A guest image is three things QEMU boots:

- the kernel: Debian's (`[kernel].package`), or your own (`kernel=PATH`, a
  bzImage or vmlinux, with `modules=PATH`, its lib/modules/RELEASE tree). A
  bzImage's payload is decompressed into an ELF booted through its PVH entry,
  so no decompression runs in the emulated CPU;
- a small initramfs (static busybox, `images/init`, the handful of modules
  that reach the root disk), which the kernel unpacks in well under a second;
- `root.img`: a read-only erofs disk holding a real Debian root made by
  mmdebstrap with the recipe's packages plus any `packages=` you ask for, each
  with its whole dependency closure, from the archive the host's apt uses
  (the host installs none of them). The guest mounts it under a RAM overlay
  and runs `images/rootinit` from it: SSH, then your commands.

Output, in `<cache>/images/<hash>/`: `vmlinux` (or `bzImage`), `initramfs.cpio`,
`root.img`, `id_ed25519`(+`.pub`), `host_key.pub`, `manifest.json`. The hash
covers the recipe files, the builder version, the kernel (package version, or
the file's digest and the modules tree), and the version of every package in
the root as apt resolves it, so a warm lookup needs no download and no
build (well under a second). Builds happen in a temporary directory under a
per-hash lock and are renamed into place: concurrent builders of the same
image (pytest-xdist workers) wait for one another instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import ConfigError, ImageBuildError
from harness.vm import kernel as kern
from harness.vm import packages as pkgs
from harness.vm import rootfs
from harness.vm.cpio import CpioEntry, CpioWriter

log = logging.getLogger(__name__)

# Bump when the builder's output changes for the same inputs.
BUILDER_VERSION = 3
XZ_MAGIC = kern.XZ_MAGIC
# The recipe, init scripts and guest sources: package data (harness/data/images, in
# the repository a link to the top-level images/), so an installed powercut builds
# guests too. The one place that says where they live.
REPO_IMAGES = Path(__file__).parents[1] / "data" / "images"

Progress = Callable[[str], None]


def recipe_dir() -> Path:
    """Where the guest recipe (recipe.toml, init, rootinit, guest-files, guest-src) lives."""
    return REPO_IMAGES


def cache_root() -> Path:
    """`$POWERCUT_CACHE`, or `~/.cache/powercut`."""
    env = os.environ.get("POWERCUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "powercut"


@dataclass(frozen=True)
class GuestImage:
    """A built image: everything needed to boot it with any QEMU or libvirt."""

    directory: Path
    recipe_hash: str
    kernel: Path  # what QEMU's -kernel gets: the PVH ELF, or a bzImage
    bzimage: Path  # the compressed kernel (Debian's, or yours), for comparison boots
    initramfs: Path
    ssh_key: Path  # client private key, OpenSSH format
    ssh_public_key: Path
    host_public_key: Path  # the guest's SSH host key, one "ssh-ed25519 AAAA..." line
    manifest: Path
    cmdline: str
    ssh_port: int
    fio_server_port: int
    # The read-only root disk; attached last (serial powercut-root) by MachineSpec.from_image.
    root_disk: Path | None = None
    packages: tuple[str, ...] = ()  # the packages asked for beyond the recipe's
    kernel_release: str = ""
    # Feature name → "built in" | "module" | "missing" | "unknown" (see harness.vm.kernel).
    kernel_features: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = directory / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ImageBuildError(
                f"cannot read image manifest {manifest}: {exc}; rebuild with `powercut image build`"
            ) from exc
        files = data.get("files", {})
        root = files.get("root_disk")
        return cls(
            directory=directory,
            recipe_hash=data["recipe_hash"],
            kernel=directory / files.get("kernel", "vmlinux"),
            bzimage=directory / files.get("bzimage", "vmlinuz"),
            initramfs=directory / "initramfs.cpio",
            ssh_key=directory / "id_ed25519",
            ssh_public_key=directory / "id_ed25519.pub",
            host_public_key=directory / "host_key.pub",
            manifest=manifest,
            cmdline=data["cmdline"],
            ssh_port=data["ssh_port"],
            fio_server_port=data["fio_server_port"],
            root_disk=directory / root if root else None,
            packages=tuple(data.get("extra_packages", ())),
            kernel_release=data.get("kernel", {}).get("release", ""),
            kernel_features=dict(data.get("kernel_features", {})),
        )

    def check_features(self, needs: Iterable[str], *, field_name: str = "kernel") -> None:
        """Raise ConfigError if this image's kernel lacks a feature in `needs` (no boot).

        Features the build could not check (a kernel without a config or a
        modules tree) pass here; the guest's init reports them at boot.
        """
        missing = [
            n for n in needs if self.kernel_features.get(n, "unknown") == kern.State.MISSING.value
        ]
        unknown_names = [n for n in needs if n not in kern.FEATURES]
        if unknown_names:
            raise ConfigError(
                f"unknown kernel feature {unknown_names[0]!r}; known: {', '.join(kern.FEATURES)}"
            )
        if missing:
            whys = ", ".join(
                f"{n} ({kern.FEATURES[n].why}: {kern.FEATURES[n].config})" for n in missing
            )
            raise ConfigError(
                f"{field_name}: the kernel of image {self.recipe_hash} ({self.kernel_release}) "
                f"lacks {whys}; build it in or as a module and pass its modules tree"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "recipe_hash": self.recipe_hash,
            "kernel": str(self.kernel),
            "bzimage": str(self.bzimage),
            "initramfs": str(self.initramfs),
            "root_disk": str(self.root_disk) if self.root_disk else None,
            "ssh_key": str(self.ssh_key),
            "ssh_public_key": str(self.ssh_public_key),
            "host_public_key": str(self.host_public_key),
            "manifest": str(self.manifest),
            "cmdline": self.cmdline,
            "ssh_port": self.ssh_port,
            "fio_server_port": self.fio_server_port,
            "packages": list(self.packages),
            "kernel_release": self.kernel_release,
            "kernel_features": self.kernel_features,
        }


@dataclass(frozen=True)
class BuildResult:
    image: GuestImage
    cache_hit: bool
    seconds: float


# -- helpers -----------------------------------------------------------------


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{what}: {argv[0]} is not installed; run ci/bootstrap (Debian 12)"
        ) from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def _guest_path(host_path: str) -> str:
    """Where a file goes in the initramfs: a merged-/usr layout, relative to the root."""
    p = host_path.lstrip("/")
    for top in ("bin/", "sbin/", "lib/", "lib64/"):
        if p.startswith(top):
            return "usr/" + p
    return p


def _needed(path: str) -> list[str]:
    out = _run(["readelf", "-d", "-W", path], f"reading the dynamic section of {path}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@dataclass(frozen=True)
class Stub:
    """A library replaced by a stub that exports the symbols its importers use."""

    soname: str
    real: str  # the host library it stands in for
    importers: tuple[str, ...]  # host paths of the ELF files that link it


def _stub_library(stub: Stub, work: Path) -> bytes:
    """Compile a stand-in for `stub.real`: same soname, the imported symbols and versions.

    Functions trap if ever called (say, fio's rbd engine), and data objects
    are zero-filled, so what the guest never uses costs nothing at boot.
    """
    kinds: dict[str, tuple[str, int]] = {}
    out = _run(["nm", "-DS", "--defined-only", stub.real], f"reading the symbols of {stub.real}")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        size = int(parts[1], 16) if len(parts) == 4 else 0
        kind, name = parts[-2], parts[-1].split("@", 1)[0]
        kinds[name] = (kind, size)
    versions: dict[str, set[str]] = {}
    wanted: set[str] = set()
    for importer in stub.importers:
        und = _run(["nm", "-D", "--undefined-only", importer], f"reading {importer}")
        for line in und.splitlines():
            ref = line.split()[-1]
            name, _, version = ref.partition("@")
            if name in kinds:
                wanted.add(name)
                versions.setdefault(version.lstrip("@"), set()).add(name)
    lines = [f"/* powercut stub for {stub.soname} (from {stub.real}) */"]
    for name in sorted(wanted):
        kind, size = kinds[name]
        if kind.upper() in ("T", "W", "I", "i"):
            lines.append(
                f'__attribute__((visibility("default"))) void {name}(void) {{ __builtin_trap(); }}'
            )
        else:
            lines.append(f'__attribute__((visibility("default"))) char {name}[{max(size, 1)}];')
    src = work / f"{stub.soname}.c"
    src.write_text("\n".join(lines) + "\n")
    argv = [
        "gcc",
        "-shared",
        "-fPIC",
        "-nostdlib",
        "-w",
        "-O1",
        f"-Wl,-soname,{stub.soname}",
        "-o",
        str(work / stub.soname),
        str(src),
    ]
    named = sorted(v for v in versions if v)
    if named:
        unversioned = versions.get("", set())
        nodes = []
        for i, v in enumerate(named):
            syms = sorted(versions[v] | (unversioned if i == 0 else set()))
            nodes.append(f"{v} {{ global: {' '.join(s + ';' for s in syms)} }};")
        script = work / f"{stub.soname}.map"
        script.write_text("\n".join(nodes) + "\n")
        argv.insert(-3, f"-Wl,--version-script={script}")
    _run(argv, f"compiling the stub of {stub.soname} (needs gcc)")
    return (work / stub.soname).read_bytes()


STUB_DIR = "usr/lib/powercut/stubs"


def _stub_program(recipe: Recipe, root: Path, work: Path) -> dict[str, str]:
    """Run `[stubs].program` with stand-ins for the libraries it never uses.

    fio links the rbd, gluster, nbd, rdma and pmem engines, and loading their
    ~100 libraries (ceph, ICU, boost, krb5) costs ~0.7 s per fio start under
    TCG. The stubs go into their own directory and a wrapper of the same name
    in /usr/local/bin (first on PATH) points only that program at them, so the
    root's real libraries stay intact for any package that uses them.
    """
    conf = recipe.data.get("stubs", {})
    program, patterns = conf.get("program"), list(conf.get("libraries", []))
    if not program or not patterns:
        return {}
    prog = root / program
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    stub_dir = root / STUB_DIR
    stub_dir.mkdir(parents=True, exist_ok=True)
    stubbed: dict[str, str] = {}
    for soname in _needed(str(prog)):
        if not any(fnmatch.fnmatchcase(soname, pat) for pat in patterns):
            continue
        real = libdir / soname
        if real.is_symlink() and not os.readlink(real).startswith("/"):
            real = libdir / os.readlink(real)
        if not real.is_file():
            raise ImageBuildError(f"{program} needs {soname}, which the root does not have")
        (stub_dir / soname).write_bytes(_stub_library(Stub(soname, str(real), (str(prog),)), work))
        stubbed[soname] = str(real.relative_to(root))
    wrapper = root / "usr" / "local" / "bin" / prog.name
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n# powercut: stand-ins for libraries this program never uses (recipe [stubs])\n"
        f"LD_LIBRARY_PATH=/{STUB_DIR}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} "
        f'exec /{program} "$@"\n'
    )
    wrapper.chmod(0o755)
    return stubbed


@dataclass(frozen=True)
class Recipe:
    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path | None = None) -> Recipe:
        directory = directory or recipe_dir()
        path = directory / "recipe.toml"
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ImageBuildError(f"cannot read the image recipe {path}: {exc}") from exc
        return cls(directory, data)

    @property
    def root(self) -> dict[str, Any]:
        return dict(self.data.get("root", {}))

    @property
    def base_packages(self) -> tuple[str, ...]:
        return pkgs.normalize(self.root.get("packages", ()), "[root].packages in recipe.toml")

    def source_files(self) -> list[tuple[str, Path]]:
        """(name in the hash, path) of every recipe input file, sorted."""
        files = [("recipe.toml", self.directory / "recipe.toml")]
        for name in ("init", "rootinit"):
            files.append((name, self.directory / name))
        for sub in ("guest-files", "guest-src"):
            root = self.directory / sub
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file() or p.is_symlink():
                        files.append((f"{sub}/{p.relative_to(root)}", p))
        return files


def _sources_digest(recipe: Recipe) -> str:
    h = hashlib.sha256()
    for name, path in recipe.source_files():
        try:
            mode = path.lstat().st_mode
            body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        except OSError as exc:
            raise ImageBuildError(f"cannot read recipe file {path}: {exc}") from exc
        h.update(f"source {name} {mode:o} {len(body)}\n".encode())
        h.update(body)
    return h.hexdigest()


def resolve_kernel_package(meta: str) -> tuple[str, str]:
    """(package, version) of the kernel the metapackage `meta` depends on."""
    out = _run(
        ["apt-cache", "depends", "--important", meta], f"resolving the kernel package {meta}"
    )
    pkg = next((m.group(1) for m in re.finditer(r"Depends: (linux-image-\S+)", out)), None)
    if pkg is None:
        raise ImageBuildError(f"{meta} depends on no linux-image package; run apt-get update")
    return pkg, candidate_version(pkg)


def candidate_version(pkg: str) -> str:
    """The version `apt-get download pkg` would fetch."""
    show = _run(["apt-cache", "show", "--no-all-versions", pkg], f"reading {pkg}'s version")
    m = re.search(r"^Version: (\S+)", show, re.M)
    if m is None:
        raise ImageBuildError(f"apt-cache shows no version for {pkg}; run apt-get update")
    return m.group(1)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:24]


def _tree_digest(path: Path) -> str:
    """Names, sizes and times of every file under `path` (a modules tree)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        with contextlib.suppress(OSError):
            st = p.lstat()
            h.update(
                f"{p.relative_to(path)} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}\n".encode()
            )
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class _Plan:
    recipe: Recipe
    extra: tuple[str, ...]  # packages beyond the recipe's
    resolution: pkgs.Resolution
    kernel_package: str | None  # Debian's kernel, when no kernel file is given
    kernel_version: str | None
    kernel_file: Path | None
    modules_dir: Path | None
    recipe_hash: str


def _kernel_key(
    recipe: Recipe, kernel: Path | None, modules: Path | None, memo: Path
) -> tuple[str, str | None, str | None]:
    """(hash input, Debian kernel package, version) for the kernel part of the image."""
    if kernel is None:
        if modules is not None:
            raise ConfigError("modules: a modules tree needs its kernel (kernel = PATH) too")
        meta = recipe.data["kernel"]["package"]
        key = f"{pkgs.lists_digest()} {meta}"
        try:
            d = json.loads(memo.read_text())
            if d["key"] == key:
                return f"deb {d['package']} {d['version']}", d["package"], d["version"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        kpkg, kver = resolve_kernel_package(meta)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "package": kpkg, "version": kver}))
        os.replace(tmp, memo)
        return f"deb {kpkg} {kver}", kpkg, kver
    if not kernel.is_file():
        raise ConfigError(f"kernel: no kernel file {kernel}")
    text = f"file {_file_digest(kernel)}"
    if modules is not None:
        if not modules.is_dir():
            raise ConfigError(
                f"modules: {modules} is not a directory; give the kernel's lib/modules/RELEASE tree"
            )
        text += f" modules {_tree_digest(modules)}"
    return text, None, None


def plan(
    recipe: Recipe,
    cache: Path | None = None,
    *,
    packages: Iterable[str] = (),
    kernel: Path | None = None,
    modules: Path | None = None,
) -> _Plan:
    """Resolve every input and hash them; raises ConfigError for an unknown package."""
    cache = cache or cache_root()
    extra = pkgs.normalize(packages, "packages")
    root = recipe.root
    wanted = tuple(sorted({*recipe.base_packages, *extra}))
    resolution = pkgs.resolve(wanted, memo_dir=cache / "plans", field="packages")
    kernel = kernel.resolve() if kernel is not None else None
    modules = modules.resolve() if modules is not None else None
    kernel_text, kpkg, kver = _kernel_key(recipe, kernel, modules, cache / "plans" / "kernel.json")
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n{kernel_text}\n".encode())
    h.update(f"root {root.get('suite')} {root.get('variant')} {root.get('format')}\n".encode())
    h.update(f"packages {resolution.digest()}\n".encode())
    h.update(_sources_digest(recipe).encode())
    return _Plan(recipe, extra, resolution, kpkg, kver, kernel, modules, h.hexdigest()[:16])


# -- the build steps ---------------------------------------------------------


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
        _run(
            ["apt-get", "download", "-q", f"{package}={version}"],
            f"downloading {package} {version} (check network and apt sources)",
            cwd=Path(tmp),
        )
        got = list(Path(tmp).glob("*.deb"))
        if not got:
            raise ImageBuildError(f"apt-get download {package}={version} produced no .deb")
        os.replace(got[0], deb)
    return deb


def decompress_bzimage(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: its XZ payload, decompressed."""
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = dec.decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise ImageBuildError(
        "no XZ-compressed ELF kernel inside the bzImage; is the kernel "
        "built with CONFIG_KERNEL_XZ? set another kernel in images/recipe.toml"
    )


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _parse_modules_dep(modules_dep: str) -> dict[str, tuple[str, list[str]]]:
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        name = _norm(re.sub(r"\.ko(\.(xz|gz|zst))?$", "", Path(path).name))
        deps[name] = (path, rest.split())
    return deps


def module_load_order(modules_dep: str, builtin: str, wanted: list[str]) -> list[str]:
    """Module paths (relative to the modules dir) to insmod, dependencies first."""
    deps = _parse_modules_dep(modules_dep)
    builtins = {_norm(re.sub(r"\.ko$", "", Path(p).name)) for p in builtin.split()}
    order: list[str] = []
    for mod in wanted:
        m = _norm(mod)
        if m in builtins:
            continue
        if m not in deps:
            raise ImageBuildError(
                f"kernel module {mod} is neither built in nor in modules.dep; "
                "fix [kernel].modules in images/recipe.toml"
            )
        path, dep_paths = deps[m]
        # modules.dep lists the full closure, deepest dependency last.
        for p in [*reversed(dep_paths), path]:
            if p not in order:
                order.append(p)
    return order


def select_modules(modules_dep: str, trees: list[str]) -> list[str]:
    """Module paths under any of `trees` (a directory or one .ko), with their dependencies."""
    chosen: set[str] = set()
    for path, dep_paths in _parse_modules_dep(modules_dep).values():
        if any(path == t or path.startswith(t.rstrip("/") + "/") for t in trees):
            chosen.add(path)
            chosen.update(dep_paths)
    return sorted(chosen)


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
    _run(
        ["chroot", str(root), "dropbearkey", "-t", "ed25519", "-f", "/" + rel],
        "generating the guest SSH host key",
    )
    (root / rel).chmod(0o600)
    text = _run(["chroot", str(root), "dropbearkey", "-y", "-f", "/" + rel], "reading it")
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
        _run(
            ["gcc", "-O2", "-static", "-Wall", "-o", str(exe), str(src)],
            f"compiling {src} (needs gcc and libc6-dev)",
        )
        out[f"usr/local/bin/{src.stem}"] = exe.read_bytes()
    return out


_DIR = stat.S_IFDIR | 0o755
_FILE = stat.S_IFREG | 0o644
_EXE = stat.S_IFREG | 0o755
_LINK = stat.S_IFLNK | 0o777


class _Root:
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


@dataclass(frozen=True)
class _Kernel:
    """The kernel as unpacked for a build: what to boot, its modules, its features."""

    boot_file: Path  # vmlinux (PVH ELF) or the bzImage
    bzimage: Path
    release: str
    moddir: Path | None  # lib/modules/RELEASE with modules.dep, or None
    features: dict[str, str]


def _prepare_kernel(p: _Plan, work: Path, out: Path, cache: Path, say: Progress) -> _Kernel:
    modules_path: Path | None
    if p.kernel_file is None:
        assert p.kernel_package is not None and p.kernel_version is not None
        say(f"fetching {p.kernel_package} {p.kernel_version}")
        deb = fetch_deb(p.kernel_package, p.kernel_version, cache / "downloads")
        kroot = work / "kernel"
        _run(["dpkg-deb", "-x", str(deb), str(kroot)], f"unpacking {deb}")
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
    return _Kernel(boot, bz, release, moddir, features)


def _depmod(moddir: Path, release: str) -> None:
    """Run depmod on a lib/modules/RELEASE tree wherever it sits."""
    base = moddir.parent.parent.parent  # BASE/lib/modules/RELEASE
    if moddir.parent.name != "modules" or moddir.parent.parent.name != "lib":
        raise ImageBuildError(f"{moddir} is not laid out as BASE/lib/modules/RELEASE")
    _run(["depmod", "-b", str(base), release], "running depmod on the kernel modules")


def _install_modules(k: _Kernel, trees: list[str], root: Path) -> None:
    """Copy the kernel's chosen module subtrees into the root and index them."""
    if k.moddir is None:
        return
    dest = root / "usr" / "lib" / "modules" / k.release
    dest.mkdir(parents=True, exist_ok=True)
    dep = (k.moddir / "modules.dep").read_text()
    for rel in select_modules(dep, trees):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(k.moddir / rel, target)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (k.moddir / meta).is_file():
            shutil.copyfile(k.moddir / meta, dest / meta)
    _run(["depmod", "-b", str(root), k.release], "indexing the guest's modules (depmod)")


def _debian_root(p: _Plan, cache: Path, target: Path) -> None:
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
    _run(["cp", "-a", "--reflink=auto", str(stored), str(target)], "copying the Debian root")


def _build_root(
    p: _Plan, k: _Kernel, work: Path, out: Path, cache: Path, say: Progress
) -> dict[str, Any]:
    recipe = p.recipe
    conf = recipe.root
    root = work / "root"
    say(f"making the Debian root ({len(p.resolution.requested)} packages, mmdebstrap)")
    _debian_root(p, cache, root)
    installed = rootfs.installed_versions(root)
    say("adding the harness's files to the root")
    _install_modules(k, list(recipe.data["kernel"].get("module_trees", ["kernel"])), root)
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
    stubbed = _stub_program(recipe, root, work)
    applets = _run(["chroot", str(root), "/usr/bin/busybox", "--list-full"], "listing applets")
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


def _build_initramfs(p: _Plan, k: _Kernel, work: Path, out: Path, fs_type: str) -> list[str]:
    """The small initramfs: static busybox, images/init, the modules that reach the root."""
    ir = _Root()
    for top in ("usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc"):
        ir.dir(top)
    for top in ("bin", "sbin", "lib", "lib64"):
        ir.symlink(top, f"usr/{top}")
    ir.device("dev/console", True, 5, 1)
    ir.device("dev/null", True, 1, 3)
    busybox = work / "root" / "usr" / "bin" / "busybox"
    ir.file("usr/bin/busybox", busybox.read_bytes(), _EXE)
    applets = _run([str(busybox), "--list-full"], "listing busybox applets")
    for applet in applets.split():
        g = _guest_path("/" + applet)
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
            ir.file(f"usr/lib/modules/{name}", (k.moddir / rel).read_bytes())
            names.append(name)
    ir.file("etc/modules.order", ("\n".join(names) + "\n").encode() if names else b"")
    ir.file("etc/root-fstype", f"{fs_type}\n".encode())
    ir.file("init", (p.recipe.directory / "init").read_bytes(), _EXE)
    ir.write(out / "initramfs.cpio")
    return names


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


def _cmdline(p: _Plan) -> str:
    conf = p.recipe.data["kernel"]
    extra = conf.get("package_cmdline", "") if p.kernel_file is None else ""
    return f"{conf['cmdline']} {extra}".strip()


def _build(p: _Plan, cache: Path, final: Path, force: bool, say: Progress) -> None:
    images = final.parent
    work = Path(tempfile.mkdtemp(prefix=f".build-{p.recipe_hash}-", dir=images))
    try:
        out = work / "out"
        out.mkdir()
        k = _prepare_kernel(p, work, out, cache, say)
        root_info = _build_root(p, k, work, out, cache, say)
        say("assembling the initramfs")
        modules = _build_initramfs(p, k, work, out, root_info["fs_type"])
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
            "cmdline": _cmdline(p),
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
