"""`powercut vm`: a local developer VM in one command.

    powercut vm --disk my.img -- fio --name=t --filename=/dev/vda --rw=randwrite --size=64M
    powercut vm --disk my.img --backend qemu-storage-daemon --cache none     # interactive shell
    powercut vm --libvirt qemu:///system -- cat /sys/block/vda/cache_type
    powercut vm --package sqlite3 -- sqlite3 /tmp/t.db 'select sqlite_version()'
    powercut vm --kernel bzImage --modules lib/modules/6.9.0 -- uname -r

Boots the guest with DISK as /dev/vda, runs COMMAND over SSH while streaming
its output, shuts the guest down and exits with COMMAND's exit status. With
no COMMAND it opens an interactive shell in the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from harness.block.cache import VALID_MODES, parse_cache_mode
from harness.commands.image import add_image_arguments
from harness.errors import ConfigError
from harness.vm.accel import ACCEL_CHOICES, parse_accel
from harness.vm.backends import Backend, DiskBackend, backend_names, make_backend
from harness.vm.build import ensure_image
from harness.vm.machine import Machine
from harness.vm.spec import Disk, MachineSpec

NAME = "vm"
HELP = "boot a guest with a disk, run a command in it over SSH (or open a shell)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--disk",
        type=Path,
        metavar="PATH",
        help="raw image attached as /dev/vda (default: no disk)",
    )
    parser.add_argument(
        "--backend",
        default=Backend.QEMU.value,
        choices=backend_names(),
        help="whose block layer serves the disk (default qemu: QEMU's own virtio-blk; "
        "builtin is its old name)",
    )
    parser.add_argument(
        "--cache", default="writeback", metavar="MODE", help=f"cache mode: {VALID_MODES}"
    )
    parser.add_argument(
        "--queues", type=int, default=1, metavar="N", help="virtqueues of a vhost-user disk"
    )
    parser.add_argument(
        "--libvirt", metavar="URI", help="boot through libvirt at URI (e.g. qemu:///system)"
    )
    parser.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        default=None,
        help="accelerator (default $POWERCUT_ACCEL, else a KVM probe)",
    )
    add_image_arguments(parser)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=512, metavar="MIB")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="how long COMMAND may run"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (console log, QEMU log) afterwards"
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="command to run in the guest (after --)"
    )


def _machine(spec: MachineSpec, args: argparse.Namespace, workdir: Path) -> Machine:
    accel = parse_accel(args.accel)
    if args.libvirt:
        from harness.vm.libvirt import LibvirtMachine

        return LibvirtMachine(
            spec, uri=args.libvirt, workdir=workdir / "vm", accel=accel, keep=args.keep
        )
    from harness.vm.qemu import QemuMachine

    return QemuMachine(spec, workdir=workdir / "vm", accel=accel, keep=args.keep)


def disk_backend(args: argparse.Namespace, workdir: Path) -> DiskBackend:
    """`--disk` served by `--backend` in `--cache` mode (QEMU's names: off is none)."""
    return make_backend(
        args.backend,
        args.disk.resolve(),
        workdir,
        cache=parse_cache_mode(args.cache),
        num_queues=args.queues,
    )


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.disk is not None and not args.disk.exists():
        raise ConfigError(
            f"disk image {args.disk} does not exist; create one with `truncate -s 1G {args.disk}`"
        )
    err = Console(stderr=True)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="powercut-vm-"))
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        with err.status("guest image") as spinner:
            image = ensure_image(
                args.packages,
                args.kernel,
                args.modules,
                needs=args.needs,
                progress=lambda msg: spinner.update(f"guest image: {msg}"),
            )
        disks: tuple[Disk, ...] = ()
        if args.disk is not None:
            backend = disk_backend(args, workdir)
            stack.callback(backend.stop)
            disks = (backend.start(),)
        spec = MachineSpec.from_image(image, disks=disks, cpus=args.cpus, memory_mib=args.memory)
        machine = stack.enter_context(_machine(spec, args, workdir))
        with err.status("booting the guest"):
            ssh = machine.boot()
        err.print(
            f"[dim]guest ready in {machine.boot_seconds:.1f}s ({machine.accel.value}); "
            f"work dir {workdir}[/dim]"
        )
        if not command:
            status = ssh.interactive_shell()
        else:
            status = ssh.run(
                # Joined with spaces for the guest's shell, as ssh(1) does.
                " ".join(command),
                timeout=args.timeout,
                on_stdout=lambda line: print(line, flush=True),
                on_stderr=lambda line: print(line, file=sys.stderr, flush=True),
            ).exit_code
        with err.status("shutting down"):
            machine.shutdown()
    return status
