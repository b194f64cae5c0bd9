"""Soak: many power cuts in a row on one disk; the machine and the filesystem keep coming back.

Off by default; `pytest --soak tests/vm/test_machine_soak.py` (POWERCUT_SOAK_CYCLES, default 20).
"""

from __future__ import annotations

import os

import pytest

from harness.block.cache import CacheMode
from harness.proc import live_processes
from harness.vm.spec import FileDisk

pytestmark = [pytest.mark.vm, pytest.mark.soak]


def test_repeated_power_cuts_during_writes_always_boot_and_fsck_clean(vm_factory):
    cycles = int(os.environ.get("POWERCUT_SOAK_CYCLES", "20"))
    disk = vm_factory.disk_file(128)
    machine = vm_factory(FileDisk(disk, CacheMode.WRITEBACK), name="soak")
    machine.ssh.check_output("mkfs.ext4 -q /dev/vda")
    for cycle in range(cycles):
        ssh = machine.ssh
        fsck = ssh.run("e2fsck -fy /dev/vda", timeout=300)
        assert fsck.exit_code in (0, 1), f"cycle {cycle}: {fsck.stdout}{fsck.stderr}"
        ssh.check_output(f"mount /dev/vda /mnt && echo {cycle} > /mnt/cycle && sync")
        # Writes in flight when the power goes.
        ssh.start("while :; do dd if=/dev/urandom of=/mnt/f bs=64k count=16 2>/dev/null; done")
        ssh.run("sleep 1")
        machine.power_cut()
        assert len([p for p in live_processes() if p.name.startswith("qemu-soak")]) == 0
        machine.boot()
    assert machine.ssh.check_output("mount /dev/vda /mnt && cat /mnt/cycle").strip() == str(
        cycles - 1
    )
