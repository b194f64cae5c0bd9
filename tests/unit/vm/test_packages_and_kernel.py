"""Package sets and kernel feature checks: the pure parts, on synthetic inputs."""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from harness.errors import ConfigError, ImageBuildError
from harness.vm import kernel as kern
from harness.vm import packages as pkgs
from harness.vm.image import GuestImage

# -- package sets ----------------------------------------------------------------


def test_a_package_set_hashes_the_same_whatever_the_order_and_duplicates():
    assert pkgs.set_hash(["sqlite3", "fio", "sqlite3"]) == pkgs.set_hash(["fio", "sqlite3"])
    assert pkgs.set_hash(["fio"]) != pkgs.set_hash(["fio", "sqlite3"])
    assert pkgs.normalize([" sqlite3", "fio"]) == ("fio", "sqlite3")


@pytest.mark.parametrize("bad", ["", "A", "-o", "foo bar", "x", "pkg;rm", "Sqlite3"])
def test_a_malformed_package_name_names_the_field(bad):
    with pytest.raises(ConfigError, match=r"^packages: .* is not a Debian package name"):
        pkgs.normalize([bad])


SIMULATION = """\
NOTE: This is only a simulation!
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []
Inst sqlite3 (3.40.1-2+deb12u2 Debian:12.15/oldstable [amd64])
Conf sqlite3 (3.40.1-2+deb12u2 Debian:12.15/oldstable [amd64])
"""


def test_the_simulated_install_gives_every_package_and_version():
    assert pkgs.parse_simulation(SIMULATION) == {
        "gcc-12-base": "12.2.0-14+deb12u1",
        "libc6": "2.36-9+deb12u14",
        "sqlite3": "3.40.1-2+deb12u2",
    }


def test_the_resolution_digest_changes_with_any_version():
    a = pkgs.Resolution(("sqlite3",), {"sqlite3": "1", "libc6": "2"})
    b = pkgs.Resolution(("sqlite3",), {"libc6": "2", "sqlite3": "1"})
    c = pkgs.Resolution(("sqlite3",), {"sqlite3": "1", "libc6": "3"})
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    "stderr",
    [
        "E: Unable to locate package no-such-pkg\n",
        "E: Package 'no-such-pkg' has no installation candidate\n",
    ],
)
def test_an_unknown_package_is_a_config_error_naming_field_and_package(stderr):
    err = pkgs.explain_failure(stderr, ("no-such-pkg", "sqlite3"), "packages")
    assert isinstance(err, ConfigError)
    assert str(err).startswith("packages: no package no-such-pkg in the Debian archive")


def test_an_unsatisfiable_set_quotes_apt():
    err = pkgs.explain_failure(
        "E: Unable to correct problems, you have held broken packages.\n", ("a", "b"), "--package"
    )
    assert str(err).startswith("--package: apt cannot install a, b together")
    assert "held broken packages" in str(err)


def test_the_apt_lists_digest_follows_the_lists(tmp_path):
    (tmp_path / "x_Packages").write_text("a")
    (tmp_path / "lock").write_text("")
    first = pkgs.lists_digest(tmp_path)
    (tmp_path / "lock").write_text("changed")
    assert pkgs.lists_digest(tmp_path) == first
    (tmp_path / "x_Packages").write_text("ab")
    assert pkgs.lists_digest(tmp_path) != first


# -- kernels ---------------------------------------------------------------------

CONFIG = """\
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=m
CONFIG_EROFS_FS=y
CONFIG_OVERLAY_FS=y
CONFIG_EXT4_FS=y
CONFIG_XFS_FS=m
# CONFIG_BTRFS_FS is not set
"""


def _elf_with_pvh_note(extra: bytes = b"") -> bytes:
    """A minimal 64-bit ELF with one PT_NOTE holding the Xen PVH entry note."""
    note = struct.pack("<III", 4, 4, kern.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + b"\0" * 4
    phoff, note_off = 64, 64 + 56
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 1
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note + b"Linux version 6.9.0-test (x@y) #1\0" + extra


def _bzimage(payload_elf: bytes, release: str = "6.9.0-test") -> bytes:
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x100)
    version = f"{release} (x@y) #1".encode() + b"\0"
    data[0x300 : 0x300 + len(version)] = version
    return bytes(data) + lzma.compress(payload_elf, format=lzma.FORMAT_XZ)


def _ikconfig(text: str) -> bytes:
    return b"IKCFG_ST" + gzip.compress(text.encode()) + b"IKCFG_ED"


def test_a_bzimage_gives_its_release_pvh_elf_and_embedded_config(tmp_path):
    elf = _elf_with_pvh_note(_ikconfig(CONFIG))
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(elf))
    info = kern.read_kernel(path)
    assert (info.kind, info.release, info.config_source) == ("bzImage", "6.9.0-test", "IKCONFIG")
    assert info.pvh_elf == elf
    assert info.config is not None and info.config["CONFIG_BTRFS_FS"] == "n"


def test_a_config_file_beside_the_kernel_is_used_without_ikconfig(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(_bzimage(_elf_with_pvh_note()))
    (tmp_path / "config-6.9.0-test").write_text(CONFIG)
    info = kern.read_kernel(path)
    assert info.config_source == str(tmp_path / "config-6.9.0-test")


def test_a_missing_filesystem_is_named_with_its_config_option(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note(_ikconfig(CONFIG))))
    with pytest.raises(ConfigError) as info:
        kern.check_kernel(path, None, ["virtio_blk", "btrfs"])
    msg = str(info.value)
    assert msg.startswith(f"kernel: {path} lacks")
    assert "btrfs (filesystem btrfs): CONFIG_BTRFS_FS is not set" in msg
    assert "virtio_blk (" not in msg  # built in: not a problem


def test_a_module_feature_needs_the_modules_tree(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note(_ikconfig(CONFIG))))
    with pytest.raises(ConfigError, match=r"virtio_net .*CONFIG_VIRTIO_NET=m, a module, but no "):
        kern.check_kernel(path, None, kern.BASE_NEEDS)
    tree = tmp_path / "6.9.0-test"
    (tree / "kernel" / "drivers" / "net").mkdir(parents=True)
    (tree / "kernel" / "drivers" / "net" / "virtio_net.ko").write_bytes(b"")
    (tree / "kernel" / "fs" / "xfs").mkdir(parents=True)
    (tree / "kernel" / "fs" / "xfs" / "xfs.ko").write_bytes(b"")
    check = kern.check_kernel(path, tree, [*kern.BASE_NEEDS, "xfs", "ext4"])
    assert check.modules_needed == ["virtio_net", "xfs"]
    assert check.states["ext4"] is kern.State.BUILTIN and not check.unknown


def test_without_config_the_modules_tree_decides(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note()))
    tree = tmp_path / "6.9.0-test"
    (tree / "kernel" / "fs" / "f2fs").mkdir(parents=True)
    (tree / "kernel" / "fs" / "f2fs" / "f2fs.ko").write_bytes(b"")
    (tree / "modules.builtin").write_text(
        "kernel/fs/ext4/ext4.ko\nkernel/drivers/block/virtio_blk.ko\n"
    )
    check = kern.check_kernel(path, tree, ["ext4", "f2fs", "virtio_blk"])
    assert [check.states[n] for n in ("ext4", "f2fs", "virtio_blk")] == [
        kern.State.BUILTIN,
        kern.State.MODULE,
        kern.State.BUILTIN,
    ]
    with pytest.raises(ConfigError, match=r"xfs .*neither in modules\.builtin nor a \.ko"):
        kern.check_kernel(path, tree, ["xfs"])


def test_with_neither_config_nor_modules_the_check_says_it_cannot_tell(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note()))
    check = kern.check_kernel(path, None, ["xfs", "virtio_blk"])
    assert check.unknown == ["xfs", "virtio_blk"] and check.source == "nothing"


def test_modules_of_another_release_are_refused(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note()))
    tree = tmp_path / "6.1.0-other"
    tree.mkdir()
    (tree / "modules.builtin").write_text("")
    with pytest.raises(ConfigError, match=r"^modules: .* is for kernel 6.1.0-other but .* 6.9.0"):
        kern.check_kernel(path, tree, ["xfs"])


def test_bad_kernel_files_are_config_errors_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^kernel: no kernel file"):
        kern.read_kernel(tmp_path / "nope")
    (tmp_path / "junk").write_bytes(b"not a kernel" * 100)
    with pytest.raises(ConfigError, match="neither a bzImage nor an ELF"):
        kern.read_kernel(tmp_path / "junk")
    no_pvh = bytearray(_elf_with_pvh_note())
    no_pvh[64 + 56 + 12 : 64 + 56 + 16] = b"Foo\0"
    (tmp_path / "vmlinux").write_bytes(bytes(no_pvh))
    with pytest.raises(ConfigError, match="without a PVH entry"):
        kern.read_kernel(tmp_path / "vmlinux")


def _image(**kw) -> GuestImage:
    return GuestImage(
        directory=Path("/x"),
        recipe_hash="h",
        kernel=Path("/x/k"),
        bzimage=Path("/x/k"),
        initramfs=Path("/x/i"),
        ssh_key=Path("/x/id"),
        ssh_public_key=Path("/x/id.pub"),
        host_public_key=Path("/x/h"),
        manifest=Path("/x/m"),
        cmdline="",
        ssh_port=22,
        fio_server_port=8765,
        **kw,
    )


def test_an_unknown_feature_is_refused(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(_elf_with_pvh_note()))
    with pytest.raises(ConfigError, match="unknown kernel feature 'zfs'"):
        kern.check_kernel(path, None, ["zfs"])
    with pytest.raises(ConfigError, match="unknown kernel feature 'zfs'"):
        _image().check_features(["zfs"])


def _signed(
    body: bytes, signer: bytes = b"", key_id: bytes = b"", sig: bytes = b"S" * 681
) -> bytes:
    """`body` as scripts/sign-file leaves it: signer, key id, signature, their lengths, marker."""
    info = struct.pack(">BBBBB3xI", 0, 0, 2, len(signer), len(key_id), len(sig))
    return body + signer + key_id + sig + info + kern.MODULE_SIG_MARKER


def test_a_signed_module_loses_exactly_its_signature():
    body = b"\x7fELF" + bytes(range(256)) * 40
    assert kern.strip_module_signature(_signed(body)) == body
    assert kern.strip_module_signature(_signed(body, b"Debian", b"\x01" * 20)) == body
    # A module that ends like a signature but is not signed, and a compressed one, stay as they are.
    assert kern.strip_module_signature(body) == body
    xz = lzma.compress(_signed(body), format=lzma.FORMAT_XZ)
    assert kern.strip_module_signature(xz) == xz


def test_a_signature_longer_than_its_module_is_an_image_build_error():
    with pytest.raises(ImageBuildError, match="681 signature bytes in a"):
        kern.strip_module_signature(_signed(b"")[1:])
    with pytest.raises(ImageBuildError, match="shorter than its signature trailer"):
        kern.strip_module_signature(kern.MODULE_SIG_MARKER)


DEBIAN_SIG = (
    "CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n"
    "CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE=y\n"
)


@pytest.mark.parametrize(
    ("config", "cmdline", "loads"),
    [
        (DEBIAN_SIG, "console=ttyS0 quiet", True),
        (DEBIAN_SIG, "quiet module.sig_enforce=0", True),
        (DEBIAN_SIG, "quiet module.sig_enforce=1", False),
        (DEBIAN_SIG, "quiet module.sig_enforce", False),
        (DEBIAN_SIG, "lockdown=integrity quiet", False),
        (
            DEBIAN_SIG.replace("# CONFIG_MODULE_SIG_FORCE is not set", "CONFIG_MODULE_SIG_FORCE=y"),
            "",
            False,
        ),
        (DEBIAN_SIG + "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y\n", "", False),
        (DEBIAN_SIG + "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY=y\n", "", False),
        (None, "quiet", False),  # no config: the image keeps the signatures
    ],
)
def test_modules_lose_their_signatures_only_where_the_kernel_loads_unsigned_ones(
    config, cmdline, loads
):
    parsed = kern.parse_config(config) if config is not None else None
    assert kern.unsigned_modules_load(parsed, cmdline) is loads


def test_a_cached_image_refuses_a_filesystem_its_kernel_lacks_without_booting():
    img = _image(
        kernel_release="6.9.0",
        kernel_features={"xfs": "missing", "ext4": "built in", "f2fs": "unknown"},
    )
    img.check_features(["ext4", "f2fs"])  # unknown passes: init reports it at boot
    with pytest.raises(
        ConfigError, match=r"^kernel: .*6\.9\.0.* lacks xfs \(filesystem xfs: CONFIG"
    ):
        img.check_features(["xfs"])


# -- the image's cache key ------------------------------------------------------


@pytest.fixture
def offline_plan(monkeypatch, tmp_path):
    """plan() with apt replaced: each package resolves to itself at version 1."""
    from harness.vm import recipe as recipes

    versions = {"sqlite3": "1"}

    def resolve(packages, *, memo_dir=None, field="packages", essential=True):
        wanted = pkgs.normalize(packages, field)
        return pkgs.Resolution(wanted, {p: versions.get(p, "1") for p in wanted})

    monkeypatch.setattr(pkgs, "resolve", resolve)
    monkeypatch.setattr(recipes, "resolve_kernel_package", lambda meta: ("linux-image-x", "6.1"))
    monkeypatch.setattr(pkgs, "lists_digest", lambda lists=None: "lists")
    recipe = recipes.Recipe.load()

    def key(recipe=recipe, **kw):
        return recipes.plan(recipe, tmp_path, **kw).recipe_hash

    return key, versions


def test_the_image_key_follows_packages_versions_and_kernel(offline_plan, tmp_path):
    key, versions = offline_plan
    base = key()
    with_sqlite = key(packages=["sqlite3"])
    assert with_sqlite == key(packages=["sqlite3", "sqlite3"]) != base
    versions["sqlite3"] = "2"  # the archive moved on: a new image
    assert key(packages=["sqlite3"]) != with_sqlite
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k1")
    first = key(kernel=kernel)
    assert first != base
    kernel.write_bytes(b"k2")
    assert key(kernel=kernel) != first


def _fixed_recipe(base: Path) -> Path:
    """A recipe directory whose every hashed input (content, mode, link) is fixed."""
    files = {
        "recipe.toml": '[kernel]\npackage = "linux-image-amd64"\n'
        '[root]\nsuite = "bookworm"\nvariant = "essential"\nformat = "erofs"\n'
        'packages = ["fio"]\n',
        "init": "#!/bin/sh\necho stage 1\n",
        "rootinit": "#!/bin/sh\necho stage 2\n",
        "guest-files/etc/motd": "powercut\n",
        "guest-src/ackrecords.c": "int main(void) { return 0; }\n",
    }
    directory = base / "recipe"
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        (directory / name).chmod(0o755 if name in ("init", "rootinit") else 0o644)
    (directory / "guest-files" / "etc" / "issue").symlink_to("motd")
    return directory


def test_the_image_key_of_a_fixed_recipe_has_not_moved(offline_plan, tmp_path):
    """The key names every cached image on every machine: a refactor must not change it.

    Bump BUILDER_VERSION (and these values) only when the builder's output changes
    (4: modules without their signatures).
    """
    from harness.vm.recipe import Recipe

    key, _ = offline_plan
    recipe = Recipe.load(_fixed_recipe(tmp_path))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"a kernel")
    modules = tmp_path / "modules" / "6.1.0"
    (modules / "kernel").mkdir(parents=True)
    (modules / "modules.dep").write_text("kernel/virtio_blk.ko:\n")
    for path in (modules / "modules.dep", modules / "kernel"):
        path.chmod(0o644 if path.is_file() else 0o755)
        os.utime(path, ns=(10**18, 10**18))
    got = {
        "debian kernel": key(recipe),
        "packages": key(recipe, packages=["sqlite3", "xfsprogs"]),
        "kernel file": key(recipe, kernel=kernel),
        "kernel and modules": key(recipe, kernel=kernel, modules=modules),
    }
    assert got == {
        "debian kernel": "00656116ff2fa2cc",
        "packages": "374a0507a67cfbe2",
        "kernel file": "d9f6ac44655e9c42",
        "kernel and modules": "95fa0cf4518226a7",
    }


def test_modules_without_a_kernel_and_a_missing_kernel_are_config_errors(offline_plan, tmp_path):
    key, _ = offline_plan
    with pytest.raises(ConfigError, match=r"^modules: a modules tree needs its kernel"):
        key(modules=tmp_path)
    with pytest.raises(ConfigError, match=r"^kernel: no kernel file"):
        key(kernel=tmp_path / "missing")
