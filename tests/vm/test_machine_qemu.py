"""QemuMachine end to end: boot, SSH, disks, power cut (QEMU started directly)."""

from __future__ import annotations

import pytest

from harness.errors import CommandError
from harness.vm.spec import FileDisk

pytestmark = pytest.mark.vm


def test_boots_and_runs_commands_over_ssh(vm_factory):
    disk = vm_factory.disk_file(64)
    machine = vm_factory(FileDisk(disk))
    guest = machine.ssh
    assert guest.check_output("echo hello").strip() == "hello"
    result = guest.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandError) as info:
        guest.check_output("echo broken >&2; false")
    assert info.value.exit_code == 1 and "broken" in info.value.stderr
    size = int(guest.check_output("blockdev --getsize64 /dev/vda"))
    assert size == 64 * 1024 * 1024
    assert machine.qmp.cmd("query-status")["status"] == "running"
