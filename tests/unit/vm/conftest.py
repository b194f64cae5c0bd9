"""What the machine-layer unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.vm.spec import MachineSpec


@pytest.fixture
def bare_spec(tmp_path: Path) -> MachineSpec:
    """A machine with no disks whose kernel, initramfs and key are paths in tmp_path that
    need not exist: enough for QEMU's argv, a domain's XML or a start that never boots."""
    return MachineSpec(
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "initramfs",
        append="console=ttyS0",
        ssh_key=tmp_path / "key",
        host_public_key=None,
    )
