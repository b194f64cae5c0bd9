"""LibvirtMachine end to end on qemu:///system (the daemon is started when none runs)."""

from __future__ import annotations

import pytest

from harness.block.cache import CacheMode
from harness.guest.fio import RW, FioJob, run_fio
from harness.vm.backends import Backend, make_backend
from harness.vm.libvirt import DEFAULT_URI
from harness.vm.spec import FileDisk

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]


@pytest.fixture(scope="module")
def libvirt_vm(module_vm_factory):
    builtin = FileDisk(module_vm_factory.disk_file(64, "builtin.img"), CacheMode.WRITETHROUGH)
    qsd = make_backend(
        Backend.QSD,
        module_vm_factory.disk_file(96, "qsd.img"),
        module_vm_factory.tmpdir,
        name="qsd0",
    )
    module_vm_factory.add_cleanup(qsd.stop)
    for name, path in qsd.logs().items():
        module_vm_factory.add_log(name, path)
    return module_vm_factory(builtin, qsd.start(), libvirt=DEFAULT_URI, name="lv")


def test_libvirt_guest_answers_ssh_and_qmp(libvirt_vm):
    assert libvirt_vm.ssh.check_output("uname -s").strip() == "Linux"
    assert libvirt_vm.qmp.cmd("query-status")["status"] == "running"
    xml = libvirt_vm.xml_path.read_text()
    assert 'type="vhostuser"' in xml and "memfd" in xml


def test_libvirt_disks_keep_order_and_cache_mode(libvirt_vm):
    ssh = libvirt_vm.ssh
    assert int(ssh.check_output("blockdev --getsize64 /dev/vda")) == 64 << 20
    assert int(ssh.check_output("blockdev --getsize64 /dev/vdb")) == 96 << 20
    assert ssh.check_output("cat /sys/block/vda/cache_type").strip() == "write through"


@pytest.mark.parametrize("dev", ["/dev/vda", "/dev/vdb"], ids=["builtin", "qemu-storage-daemon"])
def test_fio_runs_on_libvirt_disks(libvirt_vm, dev):
    job = FioJob("lv", dev, RW.RANDWRITE, size="8M", iodepth=8, verify="crc32c")
    result = run_fio(libvirt_vm.ssh, [job], timeout=300)
    assert result.errors == 0 and result.jobs[0].read.io_bytes == 8 << 20


def test_libvirt_power_cut_and_boot_again(libvirt_vm):
    ssh = libvirt_vm.ssh
    ssh.check_output("echo marker | dd of=/dev/vda bs=4096 count=1 conv=sync oflag=direct")
    libvirt_vm.power_cut()
    assert not libvirt_vm.running
    ssh = libvirt_vm.boot()
    assert ssh.check_output("head -c 6 /dev/vda") == "marker"
