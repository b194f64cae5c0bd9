"""A real Linux guest on the powercut vhost-user-blk backend (QEMU 7.2, vhost-user-blk-pci)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.testing.disk import powercut_serve
from harness.vm.backends import ProcessBackend

pytestmark = pytest.mark.vm

SERIAL = "PCSERIAL0001"


@pytest.fixture(scope="module")
def served(module_vm_factory: Any) -> Iterator[tuple[ProcessBackend, Any]]:
    """One guest for the module: 2 vCPUs, a 2-queue powercut disk in writeback mode."""
    image = module_vm_factory.disk_file(256, "guest.img")
    disk = powercut_serve(
        image,
        module_vm_factory.tmpdir / "pc",
        name="vda",
        cache="writeback",
        num_queues=2,
        serial=SERIAL,
    )
    module_vm_factory.add_log("powercut backend", disk.log_path)
    module_vm_factory.add_cleanup(disk.stop)
    machine = module_vm_factory(disk.start(), cpus=2)
    yield disk, machine
    disk.stop()


def test_serial_is_visible_in_sysfs(served: tuple[ProcessBackend, Any]) -> None:
    _, machine = served
    assert machine.ssh.check_output("cat /sys/block/vda/serial").strip() == SERIAL


def test_guest_uses_both_queues(served: tuple[ProcessBackend, Any]) -> None:
    disk, machine = served
    assert machine.ssh.check_output("ls /sys/block/vda/mq").split() == ["0", "1"]
    # One reader per vCPU: blk-mq maps each CPU to its own queue.
    machine.ssh.check_output(
        "for c in 0 1; do taskset -c $c dd if=/dev/vda of=/dev/null bs=64k count=64 "
        "iflag=direct 2>/dev/null & done; wait"
    )
    queues = disk.stats()["queues"]
    assert all(q["completed"] > 0 for q in queues), queues


def test_mkfs_mount_write_and_fsck(served: tuple[ProcessBackend, Any]) -> None:
    _, machine = served
    g = machine.ssh
    g.check_output("mkfs.ext4 -q -F /dev/vda", timeout=300)
    g.check_output(
        "mount /dev/vda /mnt && dd if=/dev/urandom of=/mnt/f bs=1M count=8 "
        "2>/dev/null && sync && md5sum /mnt/f > /tmp/sum && umount /mnt"
    )
    g.check_output("mount /dev/vda /mnt && md5sum -c /tmp/sum && umount /mnt")
    g.check_output("e2fsck -fn /dev/vda", timeout=300)


def test_fio_verify(served: tuple[ProcessBackend, Any]) -> None:
    _, machine = served
    out = machine.ssh.check_output(
        "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=32M "
        "--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 "
        "--verify_fatal=1 --numjobs=1 --output-format=terse",
        timeout=600,
    )
    assert out.strip(), "fio printed nothing"


def test_discard_and_write_zeroes(served: tuple[ProcessBackend, Any]) -> None:
    disk, machine = served
    g = machine.ssh
    assert int(g.check_output("cat /sys/block/vda/queue/discard_max_bytes")) > 0
    assert int(g.check_output("cat /sys/block/vda/queue/write_zeroes_max_bytes")) > 0
    before = disk.stats()["requests"]
    g.check_output("blkdiscard -o $((100<<20)) -l $((1<<20)) /dev/vda")
    after = disk.stats()["requests"]
    assert after.get("DISCARD", 0) > before.get("DISCARD", 0)
    # mke2fs zeroes its inode tables and journal with BLKZEROOUT/FALLOC_FL_ZERO_RANGE,
    # which the kernel sends as VIRTIO_BLK_T_WRITE_ZEROES (the guest's busybox
    # blkdiscard has no -z).
    g.check_output(
        "/sbin/mke2fs -q -F -t ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/vda",
        timeout=300,
    )
    zeroed = disk.stats()["requests"]
    assert zeroed.get("WRITE_ZEROES", 0) > after.get("WRITE_ZEROES", 0)
    g.check_output("e2fsck -fn /dev/vda", timeout=300)


def test_guest_cache_type_toggle_changes_fua(served: tuple[ProcessBackend, Any]) -> None:
    disk, machine = served
    g = machine.ssh
    assert g.check_output("cat /sys/block/vda/cache_type").strip() == "write back"
    assert disk.stats()["write_cache"] is True

    def fua_after_write() -> int:
        g.check_output(
            "dd if=/dev/urandom of=/dev/vda bs=4k count=16 seek=1000 oflag=direct 2>/dev/null"
        )
        return int(disk.stats()["block"]["fua_writes"])

    base = fua_after_write()
    assert fua_after_write() == base  # write back: no FUA
    g.check_output("echo 'write through' > /sys/block/vda/cache_type")
    assert disk.stats()["write_cache"] is False
    wt = fua_after_write()
    assert wt >= base + 16  # every write is FUA now
    g.check_output("echo 'write back' > /sys/block/vda/cache_type")
    assert disk.stats()["write_cache"] is True
    assert fua_after_write() == wt


def test_read_only_disk(vm_factory: Any, powercut_disk: Any) -> None:
    disk = powercut_disk(vm_factory, size_mib=32, read_only=True)
    machine = vm_factory(disk.start())
    g = machine.ssh
    assert g.check_output("cat /sys/block/vda/ro").strip() == "1"
    g.check_output("dd if=/dev/vda of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null")
    result = g.run("dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct")
    assert not result.ok
    assert disk.stats()["requests"].get("OUT", 0) == 0


def test_guest_power_cut_then_a_new_qemu_on_the_same_backend(
    vm_factory: Any,
    powercut_disk: Any,
) -> None:
    """QEMU killed mid-I/O: the backend drops that connection and serves the next QEMU."""
    disk = powercut_disk(vm_factory, size_mib=64)
    spec_disk = disk.start()
    first = vm_factory(spec_disk, name="first")
    first.ssh.check_output(
        "dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null && "
        "dd if=/tmp/blob of=/dev/vda bs=1M oflag=direct 2>/dev/null && "
        "md5sum < /tmp/blob"
    )
    want = first.ssh.check_output("md5sum < /tmp/blob").split()[0]
    first.ssh.start("dd if=/dev/urandom of=/dev/vda bs=64k seek=256 count=100000 oflag=direct")
    time.sleep(1.0)  # let the background writer get going before the cut
    first.power_cut()
    second = vm_factory(spec_disk, name="second")
    got = second.ssh.check_output(
        "dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum"
    ).split()[0]
    assert got == want
    stats = disk.stats()
    assert stats["connections"] == 2 and stats["connected"]


def test_fio_verify_with_o_direct_and_two_queues(
    vm_factory: Any,
    powercut_disk: Any,
) -> None:
    """cache=none: requests overlap on helper threads and complete out of order."""
    disk = powercut_disk(vm_factory, size_mib=64, cache="none", num_queues=2)
    machine = vm_factory(disk.start(), cpus=2)
    machine.ssh.check_output(
        "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=24M "
        "--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 "
        "--verify_fatal=1 --numjobs=2 --offset_increment=32M --size=24M --output-format=terse",
        timeout=600,
    )
    assert disk.stats()["requests"]["OUT"] >= 2 * 24 * 256
