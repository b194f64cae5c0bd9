"""Build the guest image from Debian packages, cached by the recipe's hash.

The guest is a Debian kernel plus an uncompressed initramfs that runs from
RAM. Two choices make it boot in seconds under TCG: the kernel is the
decompressed ELF inside Debian's bzImage, booted through its PVH entry (so no
decompression stage runs in the emulated CPU), and init is a short busybox
script that loads only the modules the harness needs and starts dropbear.

Output, in `<cache>/images/<hash>/`: `vmlinux`, `vmlinuz` (the original, for
comparison boots), `initramfs.cpio`, `id_ed25519`(+`.pub`), `host_key.pub`,
`manifest.json`. Built in a temporary directory and renamed into place, so a
half-built image is never seen and concurrent builds are harmless.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import ImageBuildError
from harness.vm.cpio import CpioEntry, CpioWriter

log = logging.getLogger(__name__)

# Bump when the builder's output changes for the same recipe.
BUILDER_VERSION = 2
XZ_MAGIC = b"\xfd7zXZ\x00"
REPO_IMAGES = Path(__file__).resolve().parents[2] / "images"

Progress = Callable[[str], None]


def cache_root() -> Path:
    """`$POWERCUT_CACHE`, or `~/.cache/powercut`."""
    env = os.environ.get("POWERCUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "powercut"


@dataclass(frozen=True)
class GuestImage:
    """A built image: everything needed to boot it with any QEMU or libvirt."""

    directory: Path
    recipe_hash: str
    kernel: Path  # uncompressed ELF, PVH entry
    bzimage: Path  # Debian's original compressed kernel
    initramfs: Path
    ssh_key: Path  # client private key, OpenSSH format
    ssh_public_key: Path
    host_public_key: Path  # the guest's SSH host key, one "ssh-ed25519 AAAA..." line
    manifest: Path
    cmdline: str
    ssh_port: int
    fio_server_port: int

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = directory / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ImageBuildError(
                f"cannot read image manifest {manifest}: {exc}; rebuild with `powercut image build`"
            ) from exc
        return cls(
            directory=directory,
            recipe_hash=data["recipe_hash"],
            kernel=directory / "vmlinux",
            bzimage=directory / "vmlinuz",
            initramfs=directory / "initramfs.cpio",
            ssh_key=directory / "id_ed25519",
            ssh_public_key=directory / "id_ed25519.pub",
            host_public_key=directory / "host_key.pub",
            manifest=manifest,
            cmdline=data["cmdline"],
            ssh_port=data["ssh_port"],
            fio_server_port=data["fio_server_port"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "recipe_hash": self.recipe_hash,
            "kernel": str(self.kernel),
            "bzimage": str(self.bzimage),
            "initramfs": str(self.initramfs),
            "ssh_key": str(self.ssh_key),
            "ssh_public_key": str(self.ssh_public_key),
            "host_public_key": str(self.host_public_key),
            "manifest": str(self.manifest),
            "cmdline": self.cmdline,
            "ssh_port": self.ssh_port,
            "fio_server_port": self.fio_server_port,
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
    """Where a host file goes in the guest: a merged-/usr layout, relative to the root."""
    p = host_path.lstrip("/")
    for top in ("bin/", "sbin/", "lib/", "lib64/"):
        if p.startswith(top):
            return "usr/" + p
    return p


def ldd_closure(binary: str) -> list[str]:
    """The shared libraries and ELF interpreter `binary` loads, as host paths."""
    return list(_ldd_map(binary).values())


def _ldd_map(binary: str) -> dict[str, str]:
    """soname (or the interpreter's path) → host path, for everything `binary` loads."""
    out = _run(["ldd", binary], f"resolving the libraries of {binary}")
    libs: dict[str, str] = {}
    for line in out.splitlines():
        line = line.strip()
        if m := re.match(r"(\S+) => (/\S+)", line):
            libs[m.group(1)] = m.group(2)
        elif m := re.match(r"(/\S+) \(0x", line):
            libs[m.group(1)] = m.group(1)
    return libs


def _needed(path: str) -> list[str]:
    out = _run(["readelf", "-d", "-W", path], f"reading the dynamic section of {path}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@dataclass(frozen=True)
class Stub:
    """A library replaced by a stub that exports the symbols its importers use."""

    soname: str
    real: str  # the host library it stands in for
    importers: tuple[str, ...]  # host paths of the ELF files that link it


def library_closure(
    binaries: list[str], stub_patterns: list[str]
) -> tuple[dict[str, str], dict[str, Stub]]:
    """(guest path → host path, soname → Stub) for `binaries` and what they load.

    A library matching a stub pattern is not copied and not descended into:
    its own dependencies come along only if something else needs them.
    """
    files: dict[str, str] = {}
    importers: dict[str, set[str]] = {}
    reals: dict[str, str] = {}
    for binary in binaries:
        resolved = _ldd_map(binary)
        files[_guest_path(binary)] = binary
        interpreters = {Path(k).name for k in resolved if k.startswith("/")}
        for key, path in resolved.items():
            if key.startswith("/"):  # the ELF interpreter
                files[_guest_path(key)] = path
        todo = [binary]
        seen: set[str] = set()
        while todo:
            elf = todo.pop()
            if elf in seen:
                continue
            seen.add(elf)
            for soname in _needed(elf):
                if soname in interpreters:
                    continue
                lib = resolved.get(soname)
                if lib is None:
                    raise ImageBuildError(f"{elf} needs {soname}, which ldd did not resolve")
                if any(fnmatch.fnmatchcase(soname, pat) for pat in stub_patterns):
                    importers.setdefault(soname, set()).add(elf)
                    reals[soname] = lib
                    continue
                # Keep the soname as the guest file name: the loader looks it up by it.
                files[_guest_path(str(Path(lib).parent / soname))] = lib
                todo.append(lib)
    stubs = {so: Stub(so, reals[so], tuple(sorted(imp))) for so, imp in importers.items()}
    return files, stubs


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


def _dpkg_owners(paths: Iterable[str]) -> dict[str, str]:
    """Debian package name → version for the packages owning `paths` (unowned paths skipped)."""
    candidates: list[str] = []
    for p in paths:
        candidates.append(p)
        # dpkg knows a file by the path its package shipped, which on a
        # merged-/usr system may be the /lib or /usr/lib spelling.
        if p.startswith("/usr/"):
            candidates.append(p[4:])
        else:
            candidates.append("/usr" + p)
    proc = subprocess.run(
        ["dpkg-query", "-S", *candidates], capture_output=True, text=True, check=False
    )
    names: set[str] = set()
    for line in proc.stdout.splitlines():
        if ": " in line:
            for pkg in line.split(": ", 1)[0].split(", "):
                names.add(pkg.strip())
    if not names:
        return {}
    out = _run(
        ["dpkg-query", "-W", "-f", "${Package}:${Architecture} ${Version}\n", *sorted(names)],
        "reading package versions",
    )
    versions: dict[str, str] = {}
    for line in out.splitlines():
        name, _, version = line.partition(" ")
        versions[name.removesuffix(":amd64").removesuffix(":all")] = version
    return versions


@dataclass(frozen=True)
class Recipe:
    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path = REPO_IMAGES) -> Recipe:
        path = directory / "recipe.toml"
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ImageBuildError(f"cannot read the image recipe {path}: {exc}") from exc
        return cls(directory, data)

    @property
    def binaries(self) -> list[str]:
        return list(self.data["binaries"]["paths"])

    def source_files(self) -> list[tuple[str, Path]]:
        """(name in the hash, path) of every recipe input file, sorted."""
        files = [("recipe.toml", self.directory / "recipe.toml"), ("init", self.directory / "init")]
        for sub in ("guest-files", "guest-src"):
            root = self.directory / sub
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file() or p.is_symlink():
                        files.append((f"{sub}/{p.relative_to(root)}", p))
        return files


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


def _check_binaries(paths: list[str]) -> None:
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        raise ImageBuildError(
            f"the guest image needs {', '.join(missing)} on the host; run ci/bootstrap "
            "(it installs busybox, dropbear-bin, fio, e2fsprogs, util-linux)"
        )


@dataclass(frozen=True)
class _Plan:
    recipe: Recipe
    kernel_package: str
    kernel_version: str
    files: dict[str, str]  # guest path → host path, binaries and their libraries
    stubs: dict[str, Stub]
    packages: dict[str, str]
    downloads: dict[str, str]  # Debian package → version, fetched with apt-get download
    recipe_hash: str


# Files whose change can change what `plan` resolves: the installed packages
# (dpkg) and the candidate versions (apt lists).
_HOST_STATE = ("/var/lib/dpkg/status", "/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin")


def _sources_digest(recipe: Recipe) -> str:
    h = hashlib.sha256()
    for name, path in recipe.source_files():
        mode = path.lstat().st_mode
        body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        h.update(f"source {name} {mode:o} {len(body)}\n".encode())
        h.update(body)
    return h.hexdigest()


def _plan_key(recipe: Recipe, sources: str) -> str:
    h = hashlib.sha256(f"builder {BUILDER_VERSION}\n{sources}\n".encode())
    for path in _HOST_STATE:
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"{path} {st.st_mtime_ns} {st.st_size}\n".encode())
    return h.hexdigest()[:24]


def plan(recipe: Recipe, cache: Path | None = None) -> _Plan:
    """Resolve every input and hash them.

    Resolving takes dozens of ldd/readelf/dpkg/apt calls (seconds under
    load), so the result is remembered in the cache, keyed by the recipe and
    by the host's package database: a change to either resolves again.
    """
    sources = _sources_digest(recipe)
    memo = (cache or cache_root()) / "plans" / f"{_plan_key(recipe, sources)}.json"
    try:
        d = json.loads(memo.read_text())
        stubs = {so: Stub(so, st["real"], tuple(st["importers"])) for so, st in d["stubs"].items()}
        return _Plan(
            recipe,
            d["kernel_package"],
            d["kernel_version"],
            d["files"],
            stubs,
            d["packages"],
            d["downloads"],
            d["recipe_hash"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    p = _resolve(recipe, sources)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "kernel_package": p.kernel_package,
                "kernel_version": p.kernel_version,
                "files": p.files,
                "packages": p.packages,
                "downloads": p.downloads,
                "recipe_hash": p.recipe_hash,
                "stubs": {
                    so: {"real": st.real, "importers": list(st.importers)}
                    for so, st in p.stubs.items()
                },
            }
        )
    )
    os.replace(tmp, memo)
    return p


def _resolve(recipe: Recipe, sources: str) -> _Plan:
    binaries = recipe.binaries
    _check_binaries(binaries)
    kpkg, kver = resolve_kernel_package(recipe.data["kernel"]["package"])
    files, stubs = library_closure(
        binaries, list(recipe.data.get("stubs", {}).get("libraries", []))
    )
    packages = _dpkg_owners([*files.values(), *(s.real for s in stubs.values())])
    downloads = {pkg: candidate_version(pkg) for pkg in sorted(recipe.data.get("packages", {}))}
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\nkernel {kpkg} {kver}\n".encode())
    for name, version in downloads.items():
        h.update(f"download {name} {version}\n".encode())
    for name, version in sorted(packages.items()):
        h.update(f"package {name} {version}\n".encode())
    for gpath, hpath in sorted(files.items()):
        h.update(f"file {gpath} {hpath}\n".encode())
    for soname, stub in sorted(stubs.items()):
        h.update(f"stub {soname} {stub.real} {' '.join(stub.importers)}\n".encode())
    h.update(sources.encode())
    return _Plan(recipe, kpkg, kver, files, stubs, packages, downloads, h.hexdigest()[:16])


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


def module_load_order(modules_dep: str, builtin: str, wanted: list[str]) -> list[str]:
    """Module paths (relative to the modules dir) to insmod, dependencies first."""

    def norm(name: str) -> str:
        return name.replace("-", "_")

    deps: dict[str, tuple[str, list[str]]] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        name = norm(Path(path).name.removesuffix(".ko"))
        deps[name] = (path, rest.split())
    builtins = {norm(Path(p).name.removesuffix(".ko")) for p in builtin.split()}
    order: list[str] = []
    for mod in wanted:
        m = norm(mod)
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


def _dropbear_host_key(directory: Path) -> tuple[bytes, str]:
    key = directory / "dropbear_ed25519_host_key"
    _run(["dropbearkey", "-t", "ed25519", "-f", str(key)], "generating the guest SSH host key")
    out = _run(["dropbearkey", "-y", "-f", str(key)], "reading the guest SSH host key")
    line = next((ln for ln in out.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if line is None:
        raise ImageBuildError(f"dropbearkey printed no public key: {out!r}")
    public = " ".join(line.split()[:2])
    (directory / "host_key.pub").write_text(public + "\n")
    data = key.read_bytes()
    key.unlink()
    return data, public


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

# SSH sessions run in Debian's dynamic busybox shell, not the static one that
# init uses: busybox-static's shell prefers its own applets to real programs of
# the same name, so `blkdiscard -z` or `blockdev` would run busybox's limited
# applets instead of util-linux's. The dynamic build searches PATH like any shell.
LOGIN_BUSYBOX = "/bin/busybox"
_LOGIN_BUSYBOX_GUEST = "usr/libexec/powercut/busybox"
_LOGIN_SHELL = "/usr/libexec/powercut/sh"

_ETC = {
    "etc/passwd": f"root:x:0:0:root:/root:{_LOGIN_SHELL}\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/group": "root:x:0:\n",
    "etc/shells": f"/bin/sh\n{_LOGIN_SHELL}\n",
    "etc/hosts": "127.0.0.1 localhost powercut\n",
    "etc/profile": "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    "export PS1='powercut# '\n",
}


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


def _add_packages(p: _Plan, root: _Root, cache: Path, work: Path) -> None:
    """Copy the recipe's files out of the Debian packages it downloads."""
    for pkg, paths in sorted(p.recipe.data.get("packages", {}).items()):
        deb = fetch_deb(pkg, p.downloads[pkg], cache / "downloads")
        unpacked = work / "pkg" / pkg
        unpacked.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb}")
        for rel in paths:
            src = unpacked / rel
            if not src.is_file():
                raise ImageBuildError(
                    f"{pkg} {p.downloads[pkg]} has no {rel}; fix [packages] in images/recipe.toml"
                )
            mode = _EXE if os.access(src, os.X_OK) else _FILE
            root.file(_guest_path("/" + rel), src.read_bytes(), mode)


def _assemble(
    p: _Plan,
    kroot: Path,
    kabi: str,
    work: Path,
    cache: Path,
    client_pub: str,
    host_key: bytes,
) -> tuple[_Root, list[str]]:
    recipe = p.recipe
    root = _Root()
    for top in (
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "usr/local/bin",
        "etc/dropbear",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "var/log",
    ):
        root.dir(top)
    root.dir("root", 0o700)
    root.dir("root/.ssh", 0o700)
    # Merged /usr: every file is added under usr/ (see _guest_path), because the
    # kernel's cpio unpacker does not follow these symlinks.
    for top in ("bin", "sbin", "lib", "lib64"):
        root.symlink(top, f"usr/{top}")
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    root.device("dev/console", True, 5, 1)
    root.device("dev/null", True, 1, 3)

    for gpath, hpath in sorted(p.files.items()):
        if hpath == LOGIN_BUSYBOX:
            gpath = _LOGIN_BUSYBOX_GUEST
        mode = _EXE if os.access(hpath, os.X_OK) else _FILE
        root.file(gpath, Path(hpath).read_bytes(), mode)
    root.symlink(_LOGIN_SHELL.lstrip("/"), "busybox")
    for soname, stub in sorted(p.stubs.items()):
        root.file(
            _guest_path(str(Path(stub.real).parent / soname)), _stub_library(stub, work), _FILE
        )
    _add_packages(p, root, cache, work)
    # Applets of the guest's busybox (static, so it runs here too), where no real program is.
    busybox = work / "busybox"
    busybox.write_bytes(root.entries["usr/bin/busybox"].data)
    busybox.chmod(0o755)
    applets = _run([str(busybox), "--list-full"], "listing busybox applets")
    for applet in applets.split():
        g = _guest_path("/" + applet)
        if g not in root.entries:
            root.symlink(g, "/usr/bin/busybox")
    for name, target in recipe.data.get("links", {}).items():
        root.symlink(name, target)

    moddir = kroot / "lib" / "modules" / kabi
    order = module_load_order(
        (moddir / "modules.dep").read_text(),
        (moddir / "modules.builtin").read_text(),
        recipe.data["kernel"]["modules"],
    )
    names = []
    for rel in order:
        name = Path(rel).name
        root.file(f"usr/lib/modules/{name}", (moddir / rel).read_bytes())
        names.append(name)
    root.file("etc/modules.order", ("\n".join(names) + "\n").encode())

    for name, text in _ETC.items():
        root.file(name, text.encode())
    root.file(
        "root/.ssh/authorized_keys", (client_pub + " powercut\n").encode(), stat.S_IFREG | 0o600
    )
    root.file("etc/dropbear/dropbear_ed25519_host_key", host_key, stat.S_IFREG | 0o600)
    root.file("init", (recipe.directory / "init").read_bytes(), _EXE)

    files_dir = recipe.directory / "guest-files"
    if files_dir.is_dir():
        for src in sorted(files_dir.rglob("*")):
            rel = _guest_path("/" + str(src.relative_to(files_dir)))
            if src.is_symlink():
                root.symlink(rel, os.readlink(src))
            elif src.is_dir():
                root.dir(rel, stat.S_IMODE(src.stat().st_mode))
            else:
                root.file(rel, src.read_bytes(), stat.S_IFREG | stat.S_IMODE(src.stat().st_mode))
    for gpath, data in _compile_guest_sources(recipe.directory / "guest-src", work).items():
        root.file(gpath, data, _EXE)
    return root, names


def build(
    recipe_dir: Path = REPO_IMAGES,
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the image (or find it in the cache) and return where it is."""
    t0 = time.monotonic()
    say = progress or (lambda msg: log.info("%s", msg))
    say("resolving the recipe")
    recipe = Recipe.load(recipe_dir)
    cache = cache or cache_root()
    p = plan(recipe, cache)
    final = cache / "images" / p.recipe_hash
    if not force and (final / "manifest.json").exists():
        log.info("guest image %s is cached in %s", p.recipe_hash, final)
        return BuildResult(GuestImage.load(final), True, time.monotonic() - t0)

    (cache / "images").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{p.recipe_hash}-", dir=cache / "images"))
    try:
        say(f"fetching {p.kernel_package} {p.kernel_version}")
        deb = fetch_deb(p.kernel_package, p.kernel_version, cache / "downloads")
        say("unpacking the kernel and resolving modules")
        kroot = work / "kernel"
        _run(["dpkg-deb", "-x", str(deb), str(kroot)], f"unpacking {deb}")
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageBuildError(f"{deb} holds no boot/vmlinuz-*")
        kabi = vmlinuz.name.removeprefix("vmlinuz-")
        _run(["depmod", "-b", str(kroot), kabi], "running depmod on the kernel modules")
        out = work / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        say("decompressing the kernel")
        (out / "vmlinux").write_bytes(decompress_bzimage(vmlinuz.read_bytes()))
        say("generating SSH keys")
        client_pub = _ssh_client_key(out)
        host_key, host_pub = _dropbear_host_key(out)
        say("assembling the initramfs")
        root, modules = _assemble(p, kroot, kabi, work, cache, client_pub, host_key)
        root.write(out / "initramfs.cpio")
        guest = recipe.data.get("guest", {})
        manifest = {
            "recipe_hash": p.recipe_hash,
            "builder_version": BUILDER_VERSION,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel_package": {
                "name": p.kernel_package,
                "version": p.kernel_version,
                "release": kabi,
            },
            "packages": {**p.packages, **p.downloads},
            "modules": modules,
            "stubbed_libraries": {so: st.real for so, st in sorted(p.stubs.items())},
            "cmdline": recipe.data["kernel"]["cmdline"],
            "ssh_port": guest.get("ssh_port", 22),
            "fio_server_port": guest.get("fio_server_port", 8765),
            "host_public_key": host_pub,
            "initramfs_bytes": (out / "initramfs.cpio").stat().st_size,
            "kernel_bytes": (out / "vmlinux").stat().st_size,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        say("installing into the cache")
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(out, final)
        except OSError:
            # Another build of the same recipe won the race; its output is equivalent.
            if not (final / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuildResult(GuestImage.load(final), False, time.monotonic() - t0)


def ensure_image(progress: Progress | None = None) -> GuestImage:
    """The image for the repository's recipe, built on first use."""
    return build(progress=progress).image
