"""The image builder's pure parts: cpio archives, module order and selection, paths, stubs."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.errors import ImageBuildError
from harness.vm.cpio import CpioEntry, CpioWriter, read_cpio
from harness.vm.initramfs import guest_path, module_load_order
from harness.vm.kernelprep import select_modules
from harness.vm.stubs import Stub, needed, stub_library

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-/", min_size=1, max_size=40)
entries = st.lists(
    st.builds(
        CpioEntry,
        name=names.filter(lambda n: not n.startswith("/") and n != "TRAILER!!!"),
        mode=st.sampled_from(
            [stat.S_IFREG | 0o644, stat.S_IFREG | 0o755, stat.S_IFDIR | 0o700, stat.S_IFLNK | 0o777]
        ),
        data=st.binary(max_size=600),
    ),
    unique_by=lambda e: e.name,
    max_size=12,
)


@given(entries)
def test_cpio_round_trips_every_entry(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("cpio") / "a.cpio"
    with open(path, "wb") as f:
        w = CpioWriter(f)
        for e in items:
            w.add(e)
        w.close()
    data = path.read_bytes()
    assert len(data) % 4 == 0
    assert list(read_cpio(data)) == items


def test_cpio_rejects_duplicate_names(tmp_path):
    with open(tmp_path / "a.cpio", "wb") as f:
        w = CpioWriter(f)
        w.add(CpioEntry("etc", stat.S_IFDIR | 0o755))
        with pytest.raises(ValueError, match="duplicate"):
            w.add(CpioEntry("etc", stat.S_IFDIR | 0o755))


def test_cpio_device_nodes_keep_major_and_minor(tmp_path):
    with open(tmp_path / "a.cpio", "wb") as f:
        w = CpioWriter(f)
        w.add(CpioEntry("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
        w.close()
    (entry,) = read_cpio((tmp_path / "a.cpio").read_bytes())
    assert (entry.rdev_major, entry.rdev_minor, stat.S_ISCHR(entry.mode)) == (5, 1, True)


MODULES_DEP = """\
kernel/virtio/virtio.ko:
kernel/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
"""


def test_modules_load_after_their_dependencies_once_each():
    order = module_load_order(MODULES_DEP, "", ["virtio_blk", "ext4", "virtio_blk"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_blk.ko",
        "jbd2.ko",
        "mbcache.ko",
        "crc16.ko",
        "ext4.ko",
    ]


def test_module_names_match_with_dashes_or_underscores():
    order = module_load_order(MODULES_DEP, "", ["crc32c_intel"])
    assert order == ["kernel/arch/x86/crypto/crc32c-intel.ko"]


def test_builtin_modules_are_skipped_and_unknown_ones_rejected():
    assert module_load_order(MODULES_DEP, "kernel/fs/ext4/ext4.ko\n", ["ext4"]) == []
    with pytest.raises(ImageBuildError, match="no_such_module"):
        module_load_order(MODULES_DEP, "", ["no_such_module"])


@pytest.mark.parametrize(
    ("host", "guest"),
    [
        ("/bin/busybox", "usr/bin/busybox"),
        ("/sbin/mke2fs", "usr/sbin/mke2fs"),
        ("/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
        ("/lib64/ld-linux-x86-64.so.2", "usr/lib64/ld-linux-x86-64.so.2"),
        ("/usr/bin/fio", "usr/bin/fio"),
        ("/etc/motd", "etc/motd"),
    ],
)
def test_host_paths_map_into_a_merged_usr_guest(host, guest):
    assert guest_path(host) == guest


needs_host_fio = pytest.mark.skipif(
    not (shutil.which("fio") and shutil.which("gcc") and shutil.which("readelf")),
    reason="needs fio, gcc and binutils (ci/bootstrap installs them)",
)


@needs_host_fio
def test_a_stub_exports_what_the_importer_needs_under_the_same_soname(tmp_path):
    fio = shutil.which("fio")
    assert "libgfapi.so.0" in needed(fio)
    real = subprocess.run(["ldd", fio], capture_output=True, text=True, check=True).stdout
    path = next(ln.split()[2] for ln in real.splitlines() if "libgfapi.so.0 =>" in ln)
    data = stub_library(Stub("libgfapi.so.0", path, (fio,)), tmp_path)
    stub = tmp_path / "stub.so"
    stub.write_bytes(data)
    dynamic = subprocess.run(
        ["readelf", "-dW", str(stub)], capture_output=True, text=True, check=True
    ).stdout
    assert "Library soname: [libgfapi.so.0]" in dynamic and "NEEDED" not in dynamic
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", str(stub)], capture_output=True, text=True, check=True
    ).stdout
    imported = subprocess.run(
        ["nm", "-D", "--undefined-only", fio], capture_output=True, text=True, check=True
    ).stdout
    wanted = {line.split()[-1] for line in imported.splitlines() if "glfs_" in line}
    assert wanted and all(ref.split("@")[0] in exported for ref in wanted)
    # The versions fio asks for exist in the stub, so the loader accepts it.
    assert "GFAPI_3.4.0" in exported


def test_module_subtrees_come_with_their_dependencies():
    chosen = select_modules(MODULES_DEP, ["kernel/fs/ext4", "kernel/drivers/block/virtio_blk.ko"])
    assert chosen == sorted(
        [
            "kernel/fs/ext4/ext4.ko",
            "kernel/lib/crc16.ko",
            "kernel/fs/mbcache.ko",
            "kernel/fs/jbd2/jbd2.ko",
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/virtio/virtio.ko",
            "kernel/virtio/virtio_ring.ko",
        ]
    )
    assert "kernel/arch/x86/crypto/crc32c-intel.ko" not in chosen
    # A prefix matches whole path components only.
    assert select_modules(MODULES_DEP, ["kernel/fs/ext"]) == []
