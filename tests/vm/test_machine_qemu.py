"""QemuMachine end to end: boot, SSH, disks and cache modes, power cut (QEMU started directly).

Boots cost seconds under TCG, so the tests that only read share one machine
per module; the tests that cut power boot their own.
"""

from __future__ import annotations

import os
import time

import pytest

from harness.block.cache import CacheMode
from harness.errors import CommandError
from harness.guest.fio import RW, FioJob, run_fio
from harness.proc import live_processes
from harness.vm.backends import Backend, make_backend
from harness.vm.qemu import QemuMachine
from harness.vm.spec import FileDisk

pytestmark = pytest.mark.vm

# One builtin disk per cache mode (sizes differ so each can be told apart in
# the guest), then one qemu-storage-daemon disk.
MODES = [
    (CacheMode.WRITEBACK, "write back"),
    (CacheMode.NONE, "write back"),
    (CacheMode.WRITETHROUGH, "write through"),
    (CacheMode.DIRECTSYNC, "write through"),
    (CacheMode.UNSAFE, "write back"),
]
QSD_INDEX = len(MODES)


def _dev(index: int) -> str:
    return "/dev/vd" + "abcdefgh"[index]


@pytest.fixture(scope="module")
def multi_disk_vm(module_vm_factory):
    disks = [
        FileDisk(module_vm_factory.disk_file(64 + 8 * i, f"mode{i}.img"), mode)
        for i, (mode, _) in enumerate(MODES)
    ]
    qsd = make_backend(
        Backend.QSD,
        module_vm_factory.disk_file(128, "qsd.img"),
        module_vm_factory.tmpdir,
        name="qsd0",
    )
    module_vm_factory.add_cleanup(qsd.stop)
    disks.append(qsd.start())
    for name, path in qsd.logs().items():
        module_vm_factory.add_log(name, path)
    return module_vm_factory(*disks, name="multi")


def test_commands_report_exit_code_stdout_and_stderr(multi_disk_vm):
    guest = multi_disk_vm.ssh
    assert guest.check_output("echo hello").strip() == "hello"
    result = guest.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandError) as info:
        guest.check_output("echo broken >&2; false")
    assert info.value.exit_code == 1 and "broken" in info.value.stderr
    assert multi_disk_vm.qmp.cmd("query-status")["status"] == "running"


@pytest.mark.parametrize("program", ["blkdiscard", "blockdev", "mke2fs"])
def test_ssh_commands_run_the_real_programs_not_busybox_applets(multi_disk_vm, program):
    # The static busybox's shell would pick its own applet of the same name
    # (blkdiscard without -z, a blockdev without --getss ...).
    out = (
        multi_disk_vm.ssh.run(f"{program} -V").stdout
        + multi_disk_vm.ssh.run(f"{program} -V").stderr
    )
    assert "BusyBox" not in out
    assert ("util-linux" in out) or ("EXT2FS Library" in out), out


def test_streamed_output_arrives_while_the_command_runs(multi_disk_vm):
    arrivals: list[tuple[str, float]] = []
    t0 = time.monotonic()
    result = multi_disk_vm.ssh.run(
        "for i in 1 2 3; do echo line$i; sleep 1; done",
        timeout=30,
        on_stdout=lambda line: arrivals.append((line, time.monotonic() - t0)),
    )
    total = time.monotonic() - t0
    assert [line for line, _ in arrivals] == ["line1", "line2", "line3"]
    assert arrivals[0][1] < total - 1.5, "the first line came only at the end"
    assert result.stdout == "line1\nline2\nline3\n"
    assert list(multi_disk_vm.ssh.stream("echo a; echo b")) == ["a", "b"]


def test_files_copy_both_ways_unchanged(multi_disk_vm, tmp_path):
    data = os.urandom(300_000)
    multi_disk_vm.ssh.put_bytes(data, "/tmp/blob", mode=0o600)
    assert multi_disk_vm.ssh.check_output("stat -c %a /tmp/blob").strip() == "600"
    assert multi_disk_vm.ssh.get_bytes("/tmp/blob") == data
    with pytest.raises(CommandError):
        multi_disk_vm.ssh.get_bytes("/tmp/does-not-exist")


def test_disks_appear_in_spec_order_with_their_sizes(multi_disk_vm):
    for i in range(len(MODES)):
        size = int(multi_disk_vm.ssh.check_output(f"blockdev --getsize64 {_dev(i)}"))
        assert size == (64 + 8 * i) << 20
    qsd_size = int(multi_disk_vm.ssh.check_output(f"blockdev --getsize64 {_dev(QSD_INDEX)}"))
    assert qsd_size == 128 << 20


@pytest.mark.parametrize(
    ("index", "mode", "expected"),
    [(i, m, e) for i, (m, e) in enumerate(MODES)],
    ids=[m.value for m, _ in MODES],
)
def test_guest_sees_the_write_cache_of_the_cache_mode(multi_disk_vm, index, mode, expected):
    name = _dev(index).removeprefix("/dev/")
    seen = multi_disk_vm.ssh.check_output(f"cat /sys/block/{name}/cache_type")
    assert seen.strip() == expected, f"cache={mode.value}"


def test_qemu_storage_daemon_export_shows_write_through(multi_disk_vm):
    # facts.md: qemu-storage-daemon 7.2's vhost-user-blk export never offers a write cache.
    name = _dev(QSD_INDEX).removeprefix("/dev/")
    seen = multi_disk_vm.ssh.check_output(f"cat /sys/block/{name}/cache_type").strip()
    assert seen == "write through"


@pytest.mark.parametrize("index", [0, QSD_INDEX], ids=["builtin", "qemu-storage-daemon"])
def test_fio_verifies_random_writes(multi_disk_vm, index):
    job = FioJob("verify", _dev(index), RW.RANDWRITE, size="16M", iodepth=8, verify="crc32c")
    result = run_fio(multi_disk_vm.ssh, [job], timeout=300)
    assert result.errors == 0
    assert result.jobs[0].write.io_bytes == 16 << 20
    assert result.jobs[0].read.io_bytes == 16 << 20  # the verify pass read it all back
    assert result.write_iops > 0 and result.jobs[0].write.clat.p(99.0) > 0


def test_power_cut_loses_the_guest_but_keeps_completed_writes(vm_factory):
    disk = vm_factory.disk_file(64)
    machine = vm_factory(FileDisk(disk, CacheMode.WRITEBACK), name="cut")
    guest = machine.ssh
    guest.check_output(
        "mkfs.ext4 -q /dev/vda && mount /dev/vda /mnt && "
        "echo durable > /mnt/a && sync && echo volatile > /mnt/b"
    )
    pid = machine.process.pid
    machine.power_cut()
    assert not machine.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    guest = machine.boot()
    assert machine.boots == 2
    # e2fsck: 0 clean, 1 errors fixed (normal after a cut); 2 and above are failures.
    fsck = guest.run("e2fsck -fy /dev/vda", timeout=120)
    assert fsck.exit_code in (0, 1), fsck.stdout + fsck.stderr
    guest.check_output("mount /dev/vda /mnt")
    assert guest.check_output("cat /mnt/a").strip() == "durable"
    machine.shutdown()
    assert not machine.running
    assert "boot 2" in machine.console_log.text


def test_machine_context_leaves_nothing_behind_when_the_body_raises(guest_image, powercut_accel):
    from harness.vm.spec import MachineSpec

    spec = MachineSpec.from_image(guest_image, name="leak")
    before = set(live_processes())
    with pytest.raises(RuntimeError), QemuMachine(spec, accel=powercut_accel) as machine:
        machine.start()
        workdir = machine.workdir
        assert machine.running
        raise RuntimeError("test body failed")
    assert not machine.running
    assert not workdir.exists()
    assert set(live_processes()) == before


def test_a_vhost_user_disk_without_backend_fails_fast_with_advice(
    guest_image, powercut_accel, tmp_path
):
    from harness.errors import MachineError
    from harness.vm.spec import MachineSpec, VhostUserDisk

    spec = MachineSpec.from_image(guest_image, disks=(VhostUserDisk(tmp_path / "none.sock"),))
    with (
        QemuMachine(spec, accel=powercut_accel) as machine,
        pytest.raises(MachineError, match="no vhost-user backend socket"),
    ):
        machine.start()


def test_kvm_probe_answers_within_its_time_limit_and_leaves_nothing(guest_image):
    import time

    from harness.vm.accel import PROBE_TIMEOUT, probe_kvm

    before = set(live_processes())
    t0 = time.monotonic()
    verdict = probe_kvm(guest_image.kernel)
    assert isinstance(verdict, bool)
    assert time.monotonic() - t0 < PROBE_TIMEOUT + 5
    assert set(live_processes()) == before
