"""The guest image end to end: extra Debian packages, the four filesystems, another kernel.

Each distinct image is built once (and cached across runs); the second
kernel is Debian's `linux-image-cloud-amd64` flavour, fetched with
`apt-get download` into the test cache (never installed on the host), which
also serves as the kernel that lacks a filesystem (it has no f2fs).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ConfigError, MachineError
from harness.pytest_plugin import VMFactory
from harness.vm.build import ensure_image
from harness.vm.image import cache_root
from harness.vm.kernelprep import fetch_deb
from harness.vm.qemu import QemuMachine
from harness.vm.recipe import resolve_kernel_package
from harness.vm.spec import FileDisk
from harness.workloads import filesystem

pytestmark = pytest.mark.vm

# fsck's read-only checker for each filesystem, run after the mount's log recovery.
CHECKERS = {
    "ext4": "e2fsck -fn /dev/vda",
    "xfs": "xfs_repair -n /dev/vda",
    "btrfs": "btrfs check --readonly /dev/vda",
    "f2fs": "fsck.f2fs --dry-run /dev/vda",
}
MKFS = {
    "ext4": "mkfs.ext4 -q -F /dev/vda",
    "xfs": "mkfs.xfs -q -f /dev/vda",
    "btrfs": "mkfs.btrfs -q -f /dev/vda",
    "f2fs": "mkfs.f2fs -q -f /dev/vda",
}


def debian_kernel(flavour: str = "cloud") -> tuple[Path, Path]:
    """(vmlinuz, lib/modules/RELEASE) of Debian's `linux-image-FLAVOUR-amd64`, unpacked.

    Cached under the powercut cache, so CI downloads it once, not every run.
    """
    store = cache_root() / "test-kernels"
    package, version = resolve_kernel_package(f"linux-image-{flavour}-amd64")
    deb = fetch_deb(package, version, store)
    unpacked = store / deb.name.removesuffix(".deb")
    if not unpacked.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=store))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        try:
            os.rename(tmp, unpacked)
        except OSError:  # another worker unpacked it first
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
    (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
    return vmlinuz, unpacked / "lib" / "modules" / vmlinuz.name.removeprefix("vmlinuz-")


@pytest.fixture(scope="module")
def image_factories(request: pytest.FixtureRequest, powercut_accel: Any) -> Iterator[Any]:
    """`make(packages=..., kernel=..., modules=...)` → a VMFactory booting that image."""
    made: list[VMFactory] = []
    node: Any = request.node

    def make(
        packages: tuple[str, ...] = (), kernel: Path | None = None, modules: Path | None = None
    ):
        image = ensure_image(packages, kernel, modules)
        factory = VMFactory(
            image, powercut_accel, request.config.getoption("--keep-failed"), request.node.name
        )
        node._powercut_factories = [*getattr(node, "_powercut_factories", []), factory]
        made.append(factory)
        return factory

    try:
        yield make
    finally:
        for factory in reversed(made):
            factory.close(getattr(node, "_powercut_failed", False))


def test_a_guest_with_an_extra_package_runs_it_and_keeps_vda_for_the_disk(image_factories):
    factory = image_factories(packages=("sqlite3",))
    assert factory.image.packages == ("sqlite3",)
    machine = factory(FileDisk(factory.disk_file(32)), name="sqlite")
    guest = machine.ssh
    out = guest.check_output(
        "sqlite3 /tmp/t.db 'create table t(x); insert into t values (42); select x from t'"
    )
    assert out.strip() == "42"
    # The disk under test is /dev/vda; the root disk comes after it.
    assert guest.check_output("blockdev --getsize64 /dev/vda").strip() == str(32 << 20)
    assert guest.check_output("readlink /run/powercut/root-disk").strip() == "/dev/vdb"
    # The read-only root is writable through its RAM overlay, where daemons need it.
    guest.check_output("touch /var/lib/x /etc/x /home/x /tmp/x /run/x /root/x")


@pytest.fixture(scope="module")
def fs_machine(module_vm_factory):
    # xfs refuses filesystems under 300 MB.
    return module_vm_factory(FileDisk(module_vm_factory.disk_file(320, "fs.img")), name="fs")


@pytest.mark.parametrize("fs", ["ext4", "xfs", "btrfs", "f2fs"])
def test_each_filesystem_is_made_mounted_and_checked_in_the_guest(fs_machine, fs):
    guest = fs_machine.ssh
    guest.check_output(
        f"{MKFS[fs]} >/dev/null && mount -t {fs} /dev/vda /mnt && "
        "echo data > /mnt/f && sync && umount /mnt",
        timeout=180,
    )
    # The module came from the root's modules tree on demand, through busybox's
    # modprobe (images/rootinit), without its signature (the image strips them).
    assert fs in guest.check_output("cat /proc/filesystems")
    assert guest.check_output("cat /proc/sys/kernel/modprobe").strip() == "/run/modprobe"
    assert "E" in guest.check_output(f"cat /sys/module/{fs}/taint")
    check = guest.run(CHECKERS[fs], timeout=180)
    assert check.exit_code == 0, check.stdout + check.stderr
    guest.check_output(f"mount -t {fs} -o ro /dev/vda /mnt && cat /mnt/f && umount /mnt")


def test_a_debian_kernel_given_as_a_path_boots_with_its_modules(image_factories):
    vmlinuz, modules = debian_kernel("cloud")
    factory = image_factories(kernel=vmlinuz, modules=modules)
    assert factory.image.kernel_release == modules.name
    machine = factory(FileDisk(factory.disk_file(32)), name="cloud")
    guest = machine.ssh
    assert guest.check_output("uname -r").strip() == modules.name
    # Its own xfs module loads on demand from the tree given.
    guest.check_output("modprobe xfs && grep -qw xfs /proc/filesystems")


def test_a_kernel_lacking_the_filesystem_is_refused_before_boot():
    vmlinuz, modules = debian_kernel("cloud")  # the cloud flavour has no f2fs
    with pytest.raises(ConfigError) as info:
        ensure_image(kernel=vmlinuz, modules=modules, needs=("f2fs",))
    msg = str(info.value)
    assert msg.startswith("kernel: ") and "f2fs" in msg and "CONFIG_F2FS_FS" in msg


def test_an_unknown_package_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"^packages: no package no-such-package-xyz"):
        ensure_image(("sqlite3", "no-such-package-xyz"))
    cli = subprocess.run(
        [sys.executable, "-m", "harness.cli", "image", "build", "--package", "no-such-package-xyz"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "POWERCUT_CACHE": str(tmp_path)},
    )
    assert cli.returncode == 1
    assert "packages: no package no-such-package-xyz" in cli.stderr
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


def test_a_filesystem_the_guest_will_mount_is_loaded_while_it_boots(vm_factory):
    # What MachineSpec.from_image(needs=...) sends for a filesystem that is a module.
    spec = dataclasses.replace(vm_factory.spec(name="load"), extra_append="powercut.load=xfs")
    with QemuMachine(spec, accel=vm_factory.accel, workdir=vm_factory.tmpdir / "load") as machine:
        machine.boot(timeout=300)
        # Loaded in the background: wait for it in the guest, mounting nothing.
        waited = machine.ssh.run(
            "for i in $(seq 600); do grep -qw xfs /proc/filesystems && exit 0; sleep 0.1; done;"
            " exit 1",
            timeout=120,
        )
        assert waited.ok, "xfs never appeared in /proc/filesystems"
        # The marker the harness's mount waits on is gone once the load is done.
        gone = machine.ssh.run(f"{filesystem.WAIT_FOR_MODULES}; test ! -e {filesystem.LOADING}")
        assert gone.ok
        filesystems = machine.ssh.check_output("cat /proc/filesystems")
        assert "btrfs" not in filesystems  # only what the line named
        assert "xfs" in machine.ssh.check_output("cut -d' ' -f1 /proc/modules").split()


def test_init_stops_with_a_clear_line_when_a_needed_filesystem_is_missing(vm_factory):
    # What MachineSpec.from_image(needs=...) sends when the build could not check.
    spec = dataclasses.replace(
        vm_factory.spec(name="needs"), extra_append="powercut.needs=f2fs,nofs"
    )
    with QemuMachine(spec, accel=vm_factory.accel, workdir=vm_factory.tmpdir / "needs") as machine:
        with pytest.raises(MachineError, match="FATAL: the kernel has no nofs filesystem"):
            machine.boot(timeout=300)
        assert "no f2fs" not in machine.console_log.text  # f2fs loaded as a module


def test_a_kernel_that_cannot_be_checked_is_stopped_by_init_naming_what_is_missing(
    image_factories, tmp_path
):
    vmlinuz, _ = debian_kernel("cloud")
    bare = tmp_path / "vmlinuz"  # no config beside it, no modules tree
    shutil.copyfile(vmlinuz, bare)
    factory = image_factories(kernel=bare)
    assert factory.image.kernel_features["erofs"] == "unknown"
    machine = factory(boot=False, name="bare")
    with pytest.raises(
        MachineError, match=r"FATAL: the kernel has no erofs filesystem \(CONFIG_EROFS"
    ):
        machine.boot(timeout=300)
