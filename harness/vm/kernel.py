"""What a guest kernel offers, found out before it boots.

The harness needs some features from any kernel it boots (virtio-pci,
virtio-blk, virtio-net, erofs and overlayfs for the read-only root) and a
scenario may need one more (its filesystem). Each can be built in or a
module. This module reads what the kernel itself says, in order of trust:

1. its configuration: the `IKCONFIG` copy embedded in the kernel
   (CONFIG_IKCONFIG), or a config file beside it (`config-RELEASE`,
   `config`, `.config`; Debian ships `/boot/config-RELEASE`), or the
   `build/.config` of its modules tree;
2. its modules tree (`modules = PATH`, a `lib/modules/RELEASE` directory):
   `modules.builtin` lists what is built in, the `.ko` files what is a module.

The image builder reads the same tree after depmod: `parse_modules_dep` is
the one reader of `modules.dep` (which modules, in which order, reach the
initramfs and the root).

When neither exists (a bare bzImage without IKCONFIG and no modules), nothing
can be checked before boot; `check_kernel` says so in `KernelCheck.unknown`,
and the guest's init names a missing feature on the console if it boots that far.

A bzImage's payload is decompressed (XZ, gzip, bzip2, LZMA in Python; zstd
and LZ4 with the host's `zstd`/`lz4`) to find the
embedded config and the release; an ELF `vmlinux` is read as it is. An ELF
with a PVH entry note boots directly (no decompression under TCG); a bzImage
without a decompressible PVH ELF inside boots as a bzImage.
"""

from __future__ import annotations

import bz2
import enum
import gzip
import lzma
import re
import struct
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import ConfigError, ImageBuildError

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
# Payloads Python cannot decompress by itself: the host's tool (ci/bootstrap installs both).
_TOOLS = {ZSTD_MAGIC: ["zstd", "-dcq"], LZ4_LEGACY_MAGIC: ["lz4", "-dcq"]}
ELF_MAGIC = b"\x7fELF"
# Documentation/x86/boot.rst: the setup header.
_HDRS_OFFSET = 0x202
_KERNEL_VERSION_PTR = 0x20E
# include/xen/interface/elfnote.h: the PVH 32-bit entry point QEMU's -kernel uses.
XEN_ELFNOTE_PHYS32_ENTRY = 18
_IKCFG_START = b"IKCFG_ST"
_IKCFG_END = b"IKCFG_ED"


@dataclass(frozen=True)
class Feature:
    """A kernel feature the harness can need: its config symbol and module name."""

    name: str
    config: str
    module: str | None
    why: str


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("virtio_pci", "CONFIG_VIRTIO_PCI", "virtio_pci", "every virtio device"),
        Feature("virtio_blk", "CONFIG_VIRTIO_BLK", "virtio_blk", "the disks (/dev/vda ...)"),
        Feature("virtio_net", "CONFIG_VIRTIO_NET", "virtio_net", "the network (SSH)"),
        Feature("erofs", "CONFIG_EROFS_FS", "erofs", "the read-only guest root"),
        Feature("overlay", "CONFIG_OVERLAY_FS", "overlay", "the writable layer over the root"),
        Feature("ext4", "CONFIG_EXT4_FS", "ext4", "filesystem ext4"),
        Feature("xfs", "CONFIG_XFS_FS", "xfs", "filesystem xfs"),
        Feature("btrfs", "CONFIG_BTRFS_FS", "btrfs", "filesystem btrfs"),
        Feature("f2fs", "CONFIG_F2FS_FS", "f2fs", "filesystem f2fs"),
        Feature("squashfs", "CONFIG_SQUASHFS", "squashfs", "a squashfs root"),
    )
}
# What every guest needs, whatever it runs.
BASE_NEEDS: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net", "erofs", "overlay")
FILESYSTEMS: tuple[str, ...] = ("ext4", "xfs", "btrfs", "f2fs")


class State(enum.Enum):
    BUILTIN = "built in"
    MODULE = "module"
    MISSING = "missing"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class KernelInfo:
    """A kernel file as read from disk: its kind, release, config, and a bootable ELF."""

    path: Path
    kind: str  # "bzImage" or "elf"
    release: str | None
    config: dict[str, str] | None
    config_source: str | None
    # The ELF to boot through PVH, when the kernel has one (the file itself, or the
    # payload of a bzImage); None: boot `path` as a bzImage.
    pvh_elf: bytes | None = field(default=None, repr=False)


def _decompress_at(data: bytes, start: int) -> bytes:
    chunk = data[start:]
    try:
        if chunk.startswith(XZ_MAGIC):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(chunk)
        if chunk.startswith(GZIP_MAGIC):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(chunk)
        if chunk.startswith(BZIP2_MAGIC):
            return bz2.BZ2Decompressor().decompress(chunk)
        if chunk.startswith(LZMA_MAGIC):
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(chunk)
        for magic, argv in _TOOLS.items():
            if chunk.startswith(magic):
                # The stream is followed by the bzImage's trailer, which the tool
                # may call garbage after writing the whole ELF: judge the output.
                proc = subprocess.run(argv, input=chunk, capture_output=True, check=False)
                return proc.stdout
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
        return b""
    return b""


def payload_elf(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (XZ, gzip, bzip2 or LZMA payload), or None."""
    for magic in (XZ_MAGIC, GZIP_MAGIC, ZSTD_MAGIC, LZ4_LEGACY_MAGIC, BZIP2_MAGIC, LZMA_MAGIC):
        start = bzimage.find(magic)
        tries = 0
        while start >= 0 and tries < 8:
            elf = _decompress_at(bzimage, start)
            if elf.startswith(ELF_MAGIC):
                return elf
            start = bzimage.find(magic, start + 1)
            tries += 1
    return None


def has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF carries the Xen PVH entry note."""
    if not elf.startswith(ELF_MAGIC) or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(elf):
            break
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, off)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def embedded_config(image: bytes) -> dict[str, str] | None:
    """The IKCONFIG copy inside a kernel image (CONFIG_IKCONFIG=y), parsed, or None."""
    start = image.find(_IKCFG_START)
    if start < 0:
        return None
    end = image.find(_IKCFG_END, start)
    blob = image[start + len(_IKCFG_START) : end if end > 0 else None]
    try:
        text = gzip.decompress(blob).decode(errors="replace")
    except (OSError, EOFError, zlib.error):
        return None
    return parse_config(text)


def parse_config(text: str) -> dict[str, str]:
    """A kernel .config as {CONFIG_X: value}; "# CONFIG_X is not set" becomes "n"."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line):
            out[m.group(1)] = m.group(2)
        elif m := re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line):
            out[m.group(1)] = "n"
    return out


def _release_in(data: bytes) -> str | None:
    m = re.search(rb"Linux version (\d+\.\d+[^\s\x00]*)", data)
    return m.group(1).decode(errors="replace") if m else None


def _bzimage_release(data: bytes) -> str | None:
    if len(data) < 0x210 or data[_HDRS_OFFSET : _HDRS_OFFSET + 4] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", data, _KERNEL_VERSION_PTR)
    if ptr == 0:
        return None
    start = ptr + 0x200
    end = data.find(b"\0", start, start + 256)
    text = data[start:end].decode(errors="replace") if end > start else ""
    return text.split()[0] if text else None


def _config_beside(path: Path, release: str | None) -> Path | None:
    names = [f"config-{release}"] if release else []
    names += ["config", ".config"]
    for name in names:
        candidate = path.parent / name
        if candidate.is_file():
            return candidate
    return None


def read_kernel(path: Path, *, field_name: str = "kernel") -> KernelInfo:
    """Read a bzImage or ELF vmlinux; ConfigError (naming the field) if it is neither."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{field_name}: no kernel file {path}") from None
    except OSError as exc:
        raise ConfigError(f"{field_name}: cannot read {path}: {exc}") from exc
    elf: bytes | None
    if data.startswith(ELF_MAGIC):
        kind, elf = "elf", data
        release = _release_in(data)
    elif data[_HDRS_OFFSET : _HDRS_OFFSET + 4] == b"HdrS":
        kind = "bzImage"
        elf = payload_elf(data)
        release = _bzimage_release(data) or (_release_in(elf) if elf else None)
    else:
        raise ConfigError(
            f"{field_name}: {path} is neither a bzImage nor an ELF vmlinux "
            "(give arch/x86/boot/bzImage or vmlinux)"
        )
    config = embedded_config(elf) if elf else None
    source = "IKCONFIG" if config is not None else None
    if config is None and (beside := _config_beside(path, release)) is not None:
        config, source = parse_config(beside.read_text(errors="replace")), str(beside)
    pvh = elf if elf is not None and has_pvh_note(elf) else None
    if kind == "elf" and pvh is None:
        raise ConfigError(
            f"{field_name}: {path} is an ELF kernel without a PVH entry (CONFIG_PVH=y), "
            "so QEMU cannot boot it directly; give its bzImage instead"
        )
    return KernelInfo(path, kind, release, config, source, pvh)


@dataclass(frozen=True)
class ModulesTree:
    """A kernel's `lib/modules/RELEASE` directory: what is built in, what is a module."""

    path: Path
    builtin: frozenset[str]
    modules: dict[str, str]  # name (underscores) → path relative to the tree

    @classmethod
    def read(cls, path: Path, *, field_name: str = "modules") -> ModulesTree:
        if not path.is_dir():
            raise ConfigError(
                f"{field_name}: {path} is not a directory; give the kernel's "
                "lib/modules/RELEASE tree (from `make modules_install INSTALL_MOD_PATH=DIR`)"
            )
        builtin_file = path / "modules.builtin"
        builtin = (
            parse_modules_builtin(builtin_file.read_text())
            if builtin_file.is_file()
            else frozenset()
        )
        modules: dict[str, str] = {}
        for ko in path.rglob("*.ko*"):
            if _MODULE_FILE.search(ko.name):
                modules.setdefault(module_name(ko.name), str(ko.relative_to(path)))
        if not builtin_file.is_file() and not modules:
            raise ConfigError(
                f"{field_name}: {path} holds neither modules.builtin nor any .ko; "
                "is it the lib/modules/RELEASE directory?"
            )
        return cls(path, builtin, modules)


_MODULE_FILE = re.compile(r"\.ko(\.(xz|gz|zst))?$")


def module_name(path: str) -> str:
    """A module's name as modprobe matches it: no directory, no .ko[.xz|.gz|.zst], `_` for `-`."""
    return _MODULE_FILE.sub("", Path(path).name).replace("-", "_")


def parse_modules_builtin(text: str) -> frozenset[str]:
    """The names of the modules a `modules.builtin` lists (built into the kernel)."""
    return frozenset(module_name(p) for p in text.split())


@dataclass(frozen=True)
class ModuleDep:
    """One line of `modules.dep`: a module's path and the paths of everything it needs."""

    path: str  # relative to lib/modules/RELEASE
    needs: tuple[str, ...]  # the whole closure, deepest dependency last (depmod's order)


def parse_modules_dep(text: str) -> dict[str, ModuleDep]:
    """`modules.dep` (depmod's output) by module name."""
    deps: dict[str, ModuleDep] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[module_name(path)] = ModuleDep(path, tuple(rest.split()))
    return deps


# What `scripts/sign-file` appends to a module: the signature, then `struct
# module_signature` (algo, hash, id_type, signer_len, key_id_len, 3 pad bytes,
# big-endian sig_len), then this marker.
MODULE_SIG_MARKER = b"~Module signature appended~\n"
_MODULE_SIG_INFO = struct.Struct(">BBBBB3xI")


def strip_module_signature(data: bytes) -> bytes:
    """A module file without its appended signature (as it is if it has none).

    The kernel hashes the whole file and checks the signature at every load;
    under TCG that is over a quarter of loading ext4 (2 MB), at each boot's
    first mount. A compressed module (.ko.xz, ...) is returned as it is: its
    signature is inside the compressed payload.
    """
    if not data.endswith(MODULE_SIG_MARKER):
        return data
    end = len(data) - len(MODULE_SIG_MARKER)
    info_at = end - _MODULE_SIG_INFO.size
    if info_at < 0:
        raise ImageBuildError("module signature: the file is shorter than its signature trailer")
    _, _, _, signer_len, key_id_len, sig_len = _MODULE_SIG_INFO.unpack_from(data, info_at)
    body = info_at - signer_len - key_id_len - sig_len
    if body <= 0:
        raise ImageBuildError(
            f"module signature: {sig_len} signature bytes in a {len(data)}-byte file"
        )
    return data[:body]


def unsigned_modules_load(config: dict[str, str] | None, cmdline: str) -> bool:
    """Whether this kernel, booted with `cmdline`, loads a module with no signature.

    Only when its config is known and says so: signatures not enforced
    (CONFIG_MODULE_SIG_FORCE) and no lockdown forced by the config or asked on
    the command line (lockdown refuses unsigned modules). An unsigned module
    taints the kernel (`E`), nothing else.
    """
    if config is None:
        return False
    forced = (
        "CONFIG_MODULE_SIG_FORCE",
        "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY",
        "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY",
    )
    if any(config.get(symbol, "n") == "y" for symbol in forced):
        return False
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == "lockdown" or (key == "module.sig_enforce" and value not in ("0", "n", "N")):
            return False
    return True


@dataclass(frozen=True)
class KernelCheck:
    """Each needed feature's state; `unknown` lists what cannot be checked before boot."""

    states: dict[str, State]
    source: str  # where the answer came from

    @property
    def modules_needed(self) -> list[str]:
        return [n for n, s in self.states.items() if s is State.MODULE]

    @property
    def unknown(self) -> list[str]:
        return [n for n, s in self.states.items() if s is State.UNKNOWN]

    @property
    def missing(self) -> list[str]:
        return [n for n, s in self.states.items() if s is State.MISSING]


def feature_state(
    feature: Feature, config: dict[str, str] | None, tree: ModulesTree | None
) -> tuple[State, str]:
    """(state, why) of one feature, from the config first, else the modules tree."""
    module = feature.module
    if config is not None:
        value = config.get(feature.config, "n")
        if value == "y":
            return State.BUILTIN, f"{feature.config}=y"
        if value == "m":
            if tree is None:
                return State.MISSING, (
                    f"{feature.config}=m, a module, but no modules tree was given (modules = PATH)"
                )
            if module and module in tree.modules:
                return State.MODULE, f"{feature.config}=m"
            return State.MISSING, f"{feature.config}=m but {tree.path} has no {module}.ko"
        return State.MISSING, f"{feature.config} is not set"
    if tree is not None and module:
        if module in tree.builtin:
            return State.BUILTIN, f"{module} in modules.builtin"
        if module in tree.modules:
            return State.MODULE, f"{tree.modules[module]}"
        return State.MISSING, f"{module} is neither in modules.builtin nor a .ko in {tree.path}"
    return State.UNKNOWN, "no config and no modules tree to tell"


def check_kernel(
    kernel: Path | KernelInfo,
    modules: Path | ModulesTree | None = None,
    needs: Iterable[str] = BASE_NEEDS,
    *,
    kernel_field: str = "kernel",
    modules_field: str = "modules",
) -> KernelCheck:
    """Check that `kernel` (with its `modules` tree, optional) has every feature in `needs`.

    Raises ConfigError naming each missing feature, what needs it and how the
    answer was found. Features that cannot be checked (no config, no modules
    tree) are returned in `unknown` rather than guessed.
    """
    info = (
        kernel if isinstance(kernel, KernelInfo) else read_kernel(kernel, field_name=kernel_field)
    )
    tree = (
        modules
        if isinstance(modules, ModulesTree) or modules is None
        else ModulesTree.read(modules, field_name=modules_field)
    )
    if tree is not None and info.release and tree.path.name != info.release:
        raise ConfigError(
            f"{modules_field}: {tree.path} is for kernel {tree.path.name} but {info.path} "
            f"is {info.release}; give the lib/modules/{info.release} tree"
        )
    config = info.config
    if config is None and tree is not None and (tree.path / "build" / ".config").is_file():
        config = parse_config((tree.path / "build" / ".config").read_text(errors="replace"))
    states: dict[str, State] = {}
    problems: list[str] = []
    for name in dict.fromkeys(needs):
        feature = FEATURES.get(name)
        if feature is None:
            raise ConfigError(
                f"unknown kernel feature {name!r}; known: {', '.join(sorted(FEATURES))}"
            )
        state, why = feature_state(feature, config, tree)
        states[name] = state
        if state is State.MISSING:
            problems.append(f"{name} ({feature.why}): {why}")
    source = info.config_source or ("modules tree" if tree is not None else "nothing")
    if problems:
        raise ConfigError(
            f"{kernel_field}: {info.path} lacks what the guest needs — "
            + "; ".join(problems)
            + f" (checked against: {source}). Build the missing features in (=y) or as "
            f"modules and pass their lib/modules tree as {modules_field}"
        )
    return KernelCheck(states, source)
