"""pytest fixtures for a `powercut serve` backend on a disk image.

They compose with the machine fixtures (`vm_factory`, `module_vm_factory`):

    from harness.testing.disk import powercut_disk  # noqa: F401

    def test_mkfs(vm_factory, powercut_disk):
        disk = powercut_disk(vm_factory, cache="writethrough", queues=2, serial="S1")
        machine = vm_factory(disk.start())
        machine.ssh.check_output("mkfs.ext4 -q /dev/vda")
        assert disk.stats()["requests"]["OUT"] > 0
        disk.kill(); disk.start()            # a backend crash; QEMU reconnects

The backend process is the machine layer's `PowercutBackend` (one owner for
the process), given the extra options only tests need: serial, a
`--blockdev` graph (fault drivers such as blkdebug), and info logging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.control import control_request
from harness.vm.backends import PowercutBackend


class PowercutDisk(PowercutBackend):
    """`powercut serve` for one image, with its control socket at hand."""

    def __init__(
        self,
        image: Path,
        workdir: Path,
        *,
        serial: str = "",
        blockdev: str | None = None,
        extra_args: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(image, workdir, **kwargs)
        self.serial = serial
        self.blockdev = blockdev
        self.extra_args = extra_args

    @property
    def control_path(self) -> Path:
        return Path(f"{self.socket}.ctl")

    def argv(self) -> list[str]:
        argv = super().argv()
        serve = argv.index("serve")
        argv.insert(serve, "-v")  # info logging: connections, resubmissions, refusals
        if self.blockdev is not None:
            image_at = argv.index(str(self.image))
            argv[image_at : image_at + 1] = ["--blockdev", self.blockdev]
        if self.serial:
            argv += ["--serial", self.serial]
        return argv + list(self.extra_args)

    def control(self, cmd: str, **fields: Any) -> Any:
        return control_request(self.control_path, {"cmd": cmd, **fields})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("stats")
        return result


DiskFactory = Callable[..., PowercutDisk]


@pytest.fixture
def powercut_disk() -> Iterator[DiskFactory]:
    """`powercut_disk(vm_factory, image=None, size_mib=256, **options)` → a PowercutDisk.

    Not started: call `.start()` for the Disk to give the machine. Stopped at
    teardown, after the test's machines are closed.
    """
    disks: list[PowercutDisk] = []

    def make(
        factory: Any, image: Path | None = None, size_mib: int = 256, **options: Any
    ) -> PowercutDisk:
        name = f"pc{len(disks)}"
        image = image if image is not None else factory.disk_file(size_mib, f"{name}.img")
        disk = PowercutDisk(image, factory.tmpdir / name, name=name, **options)
        disks.append(disk)
        factory.add_log(f"{name} backend", disk.log_path)
        factory.add_cleanup(disk.stop)
        return disk

    yield make
    for disk in disks:
        disk.stop()
