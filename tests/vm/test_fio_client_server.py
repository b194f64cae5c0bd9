"""fio's own power-cut test: client on the host, server in the guest, a trigger, verify state."""

from __future__ import annotations

import pytest

from harness.block.cache import CacheMode
from harness.guest.fio import RW, FioClient, FioJob, start_fio_server
from harness.vm.spec import FileDisk

pytestmark = pytest.mark.vm


def test_verify_state_from_a_triggered_run_checks_the_disk_after_a_power_cut(vm_factory):
    disk = vm_factory.disk_file(128)
    machine = vm_factory(FileDisk(disk, CacheMode.WRITEBACK), name="fio")
    port = machine.spec.fio_server_port
    start_fio_server(machine.ssh, port)
    start_fio_server(machine.ssh, port)  # a second start finds it listening
    job = FioJob(
        "pc",
        "/dev/vda",
        RW.RANDWRITE,
        size="64M",
        iodepth=8,
        verify="crc32c",
        do_verify=False,
        verify_state_save=True,
        runtime=120,
        time_based=True,
    )
    client = FioClient("127.0.0.1", machine.host_port(port), vm_factory.tmpdir / "fio")
    # The trigger runs on the host once the server has sent the write state: it
    # cuts the guest's power in the middle of the writes.
    cut = client.run(
        [job],
        trigger_timeout=5,
        trigger=f"kill -KILL {machine.process.pid}",
        timeout=120,
        name="write",
    )
    assert [p.name for p in cut.state_files] == ["127.0.0.1-pc-0-verify.state"], cut.log
    machine.power_cut()

    machine.boot()
    start_fio_server(machine.ssh, port)
    client = FioClient("127.0.0.1", machine.host_port(port), vm_factory.tmpdir / "fio")
    check = client.run([job.verifier()], timeout=300, name="verify")
    assert check.exit_code == 0, check.log + check.output
    verified = check.result().jobs[0]
    assert verified.error == 0
    assert verified.read.io_bytes > 0, "the verify pass read nothing"

    # The same check must fail once acknowledged data is gone.
    machine.ssh.check_output("dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct")
    broken = client.run([job.verifier()], timeout=300, name="verify-broken")
    assert broken.exit_code != 0 or broken.result().errors > 0
