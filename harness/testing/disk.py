"""pytest fixtures for a `powercut serve` backend on a disk image.

They compose with the machine fixtures (`vm_factory`, `module_vm_factory`):

    from harness.testing.disk import powercut_disk  # noqa: F401

    def test_mkfs(vm_factory, powercut_disk):
        disk = powercut_disk(vm_factory, cache="writethrough", num_queues=2, serial="S1")
        machine = vm_factory(disk.start())
        machine.ssh.check_output("mkfs.ext4 -q /dev/vda")
        assert disk.stats()["requests"]["OUT"] > 0
        disk.kill(); disk.start()            # a backend crash; QEMU reconnects

A disk is the machine layer's `ProcessBackend` (one owner for every process
that serves a disk) on the `ServeOptions` built here: what tests add to a
plain disk is a serial, a `--blockdev` graph (fault drivers such as
blkdebug) and info logging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.block.cache import CacheMode, parse_cache_mode
from harness.vm.backends import ProcessBackend
from harness.vm.daemons import ServeOptions


def powercut_serve(
    image: Path,
    workdir: Path,
    *,
    name: str = "disk0",
    cache: CacheMode | str = CacheMode.WRITEBACK,
    num_queues: int = 1,
    read_only: bool = False,
    serial: str = "",
    blockdev: str | None = None,
    extra_args: tuple[str, ...] = (),
    reconnect: int = 1,
) -> ProcessBackend[ServeOptions]:
    """`powercut serve -v` for `image` (or the `blockdev` graph on it), socket and log in
    `workdir`; not started: `.start()` gives the Disk for the machine."""
    options = ServeOptions(
        image=None if blockdev is not None else Path(image),
        blockdev=blockdev,
        socket=Path(workdir) / f"{name}.sock",
        cache=parse_cache_mode(cache),
        queues=num_queues,
        read_only=read_only,
        serial=serial,
        verbose=1,  # info logging: connections, resubmissions, refusals
        extra_args=tuple(extra_args),
    )
    return ProcessBackend.logging_in(options, workdir, name, reconnect)


DiskFactory = Callable[..., ProcessBackend[ServeOptions]]


@pytest.fixture
def powercut_disk() -> Iterator[DiskFactory]:
    """`powercut_disk(vm_factory, image=None, size_mib=256, **options)` → a ProcessBackend.

    `options` are `powercut_serve`'s: cache, num_queues, read_only, serial,
    blockdev, extra_args, reconnect. Not started: call `.start()` for the
    Disk to give the machine. Stopped at teardown, after the test's machines
    are closed.
    """
    disks: list[ProcessBackend[ServeOptions]] = []

    def make(
        factory: Any, image: Path | None = None, size_mib: int = 256, **options: Any
    ) -> ProcessBackend[ServeOptions]:
        name = f"pc{len(disks)}"
        image = image if image is not None else factory.disk_file(size_mib, f"{name}.img")
        disk = powercut_serve(image, factory.tmpdir / name, name=name, **options)
        disks.append(disk)
        factory.add_log(f"{name} backend", disk.log_path)
        factory.add_cleanup(disk.stop)
        return disk

    yield make
    for disk in disks:
        disk.stop()
