"""One long-lived guest checks crash state after crash state (the `crash-state` node).

The guest mounts state A (journal recovery and all), writes, unmounts; the
backend switches to state B (`state-switch` on the control socket); the guest
must then see exactly B: not the blocks it wrote under A (the node's
throwaway layer is gone) and not the blocks it cached under A (its page cache
is dropped). The second test shows the check can fail: with the device held
open and the caches kept, the guest reads stale blocks of A.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.durability.delta import write_delta
from harness.explore.recording import sparse_copy
from harness.testing.disk import DiskFactory

pytestmark = pytest.mark.vm

SIZE_MIB = 32
SECTOR = 512
# What the checker guest does between states, after umount: BLKFLSBUF drops the block
# device's page cache (the filesystem's own caches went with the umount).
RELEASE = "blockdev --flushbufs /dev/vda"


def _state(base: Path, out: Path, name: str, text: str) -> bytes:
    """Base plus one file: the image, and (side effect) its delta beside it."""
    sparse_copy(base, out)
    src = out.with_suffix(".txt")
    src.write_text(text)
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {src} {name}", str(out)], check=True, capture_output=True
    )
    a, b = base.read_bytes(), out.read_bytes()
    sectors = [
        (i // SECTOR, b[i : i + SECTOR])
        for i in range(0, len(a), SECTOR)
        if a[i : i + SECTOR] != b[i : i + SECTOR]
    ]
    write_delta(out.with_suffix(".delta"), SECTOR, len(a), sectors)
    return b


@pytest.fixture
def states(vm_factory: Any) -> tuple[Path, Path, Path, str]:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs on the host")
    base = vm_factory.disk_file(SIZE_MIB, "base.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(base)], check=True)
    _state(base, vm_factory.tmpdir / "a.img", "A", "alpha\n")
    b = _state(base, vm_factory.tmpdir / "b.img", "B", "bravo\n")
    return (
        base,
        vm_factory.tmpdir / "a.delta",
        vm_factory.tmpdir / "b.delta",
        hashlib.md5(b).hexdigest(),
    )


def _serve(vm_factory: Any, powercut_disk: DiskFactory, base: Path, delta: Path) -> tuple[Any, Any]:
    spec = f"driver=crash-state,delta={delta},file.driver=file,file.filename={base}"
    disk = powercut_disk(vm_factory, image=base, blockdev=spec, cache="writeback")
    machine = vm_factory(disk.start())
    return disk, machine


def _mount_a_and_write(g: Any) -> None:
    assert g.check_output("mount /dev/vda /mnt && cat /mnt/A").strip() == "alpha"
    g.check_output("echo leak > /mnt/junk && echo mutated > /mnt/A && sync && umount /mnt")


def test_the_guest_sees_exactly_the_next_state(
    vm_factory: Any, powercut_disk: DiskFactory, states: tuple[Path, Path, Path, str]
) -> None:
    base, a, b, b_md5 = states
    disk, machine = _serve(vm_factory, powercut_disk, base, a)
    g = machine.ssh
    # Hold the device open across the switch, as a long-lived checker might (udev, a
    # monitoring loop): the page cache of /dev/vda then survives the umount.
    g.check_output("setsid sh -c 'exec sleep 100000 </dev/vda' </dev/null >/dev/null 2>&1 &")
    _mount_a_and_write(g)
    g.check_output(RELEASE)
    answer = disk.control("state-switch", delta=str(b))
    assert answer["discarded_sectors"] > 0
    assert g.check_output("md5sum /dev/vda").split()[0] == b_md5
    listing = g.check_output("mount /dev/vda /mnt && ls /mnt && cat /mnt/B && umount /mnt")
    assert listing.split() == ["B", "lost+found", "bravo"]


def test_skipping_the_cache_drop_shows_the_stale_state(
    vm_factory: Any, powercut_disk: DiskFactory, states: tuple[Path, Path, Path, str]
) -> None:
    """The control for the test above: without the release step the guest reads A's blocks."""
    base, a, b, b_md5 = states
    disk, machine = _serve(vm_factory, powercut_disk, base, a)
    g = machine.ssh
    g.check_output("setsid sh -c 'exec sleep 100000 </dev/vda' </dev/null >/dev/null 2>&1 &")
    _mount_a_and_write(g)
    disk.control("state-switch", delta=str(b))
    assert g.check_output("md5sum /dev/vda").split()[0] != b_md5
