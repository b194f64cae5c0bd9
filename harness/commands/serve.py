"""`powercut serve`: the block stack as a vhost-user-blk backend and/or an NBD export.

    powercut serve disk.img --socket /run/pc/vda.sock --cache none --queues 2
    powercut serve --blockdev driver=raw,file.driver=file,file.filename=d.img --socket s.sock
    powercut serve --blockdev SPEC --nbd /run/pc/nbd.sock [--nbd-export disk]
    powercut serve disk.img --nbd 127.0.0.1:10809

QEMU side (vhost-user-blk): -chardev socket,id=c,path=SOCK,reconnect=1
           -device vhost-user-blk-pci,chardev=c,num-queues=N
(guest memory must be shared: -object memory-backend-memfd,share=on).
QEMU side (NBD): -blockdev driver=nbd,server.type=unix,server.path=NBDSOCK,export=disk
(or nbd+unix:///disk?socket=NBDSOCK), under its own raw/qcow2 driver and cache mode.
Both may serve the same graph at once. A JSON-lines control socket (default
SOCK.ctl, or NBDSOCK.ctl) answers {"cmd": "stats"} and, for fault-driver
graphs, the commands in harness/vhost/fault_commands.py.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from harness.block import BlockBackend, open_backend
from harness.block.options import format_dotted, to_flat
from harness.block.throttle import BUCKETS
from harness.control import ControlServer
from harness.errors import ConfigError
from harness.nbd import NbdExport, NbdServer
from harness.storage_daemon import SocketAddress, nbd_listener
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.fault_commands import register_fault_commands
from harness.vhost.server import VhostUserBlkServer
from harness.vhost.service import run_until_signalled

NAME = "serve"
HELP = "serve a disk image to QEMU guests as a vhost-user-blk backend or an NBD export"

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="raw image file (or use --blockdev)")
    parser.add_argument(
        "--blockdev",
        metavar="SPEC",
        help="a --blockdev description instead of IMAGE, e.g. "
        "driver=raw,file.driver=file,file.filename=d.img",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="vhost-user socket to listen on (created owner-only)",
    )
    parser.add_argument(
        "--nbd",
        metavar="PATH|HOST:PORT",
        help="also (or instead) serve the graph as an NBD export on this unix socket "
        "or TCP address",
    )
    parser.add_argument(
        "--nbd-export",
        default="disk",
        metavar="NAME",
        help="the NBD export name (default: disk; the empty name also finds it)",
    )
    parser.add_argument(
        "--cache",
        default="writeback",
        metavar="MODE",
        help="writeback (default), none, writethrough, directsync, unsafe",
    )
    parser.add_argument(
        "--queues",
        type=int,
        default=1,
        metavar="N",
        help="virtqueues offered (QEMU's num-queues may use up to N)",
    )
    parser.add_argument("--read-only", action="store_true", help="a read-only disk")
    parser.add_argument("--serial", default="", help="what the guest reads as the disk serial")
    parser.add_argument("--logical-block-size", type=int, default=512, metavar="BYTES")
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (JSON lines; default SOCKET.ctl, or the NBD socket's .ctl)",
    )
    parser.add_argument("--no-control", action="store_true", help="no control socket")
    parser.add_argument(
        "--parallel-io",
        choices=("auto", "on", "off"),
        default="auto",
        help="overlap data requests on helper threads (auto: only with O_DIRECT, "
        "i.e. --cache none/directsync)",
    )
    limits = parser.add_argument_group("throttling (as QEMU's throttling.* options)")
    for bucket in BUCKETS:
        limits.add_argument(f"--{bucket}", metavar="N", help=f"limit {bucket} (per second)")
        limits.add_argument(f"--{bucket}-max", metavar="N", help=f"burst limit for {bucket}")
    limits.add_argument("--throttle-group", metavar="NAME", help="throttle group to join")


def _options(args: argparse.Namespace) -> dict[str, Any] | str:
    if bool(args.image) == bool(args.blockdev):
        raise ConfigError("give either an IMAGE or --blockdev SPEC (exactly one)")
    extra: dict[str, Any] = {}
    for bucket in BUCKETS:
        for key in (bucket, f"{bucket}-max"):
            value = getattr(args, key.replace("-", "_"))
            if value is not None:
                extra[f"throttling.{key}"] = value
    if args.throttle_group:
        extra["throttling.group"] = args.throttle_group
    if args.blockdev:
        spec: str = args.blockdev
        if extra:
            spec += "," + format_dotted(extra)
        return spec
    # IMAGE is always a file name, whatever it holds ('=' and ',' included), never options.
    return {
        "driver": "raw",
        "file": {"driver": "file", "filename": args.image},
        **{k: v for k, v in extra.items()},
    }


_HOST_PORT = re.compile(r"^\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d{1,5})$")


def nbd_address(text: str) -> SocketAddress:
    """`--nbd`: HOST:PORT (or [V6]:PORT) is TCP, anything else a unix socket path."""
    m = _HOST_PORT.match(text)
    if m and "/" not in text:
        return SocketAddress("inet", host=m["host"], port=int(m["port"]))
    return SocketAddress("unix", path=text)


def run(args: argparse.Namespace) -> int:
    if not args.socket and not args.nbd:
        raise ConfigError(
            "nothing to serve: give --socket PATH (vhost-user-blk), --nbd ADDR, or both"
        )
    nbd_addr = nbd_address(args.nbd) if args.nbd else None
    control_path = args.control
    if control_path is None and not args.no_control:
        if args.socket:
            control_path = f"{args.socket}.ctl"
        elif nbd_addr is not None and nbd_addr.type == "unix":
            control_path = f"{nbd_addr.path}.ctl"
    options = _options(args)
    if not args.socket:
        # Only NBD clients: each is told its errors and applies its own werror policy
        # (QEMU's export BlockBackends report); a stopped backend would only fail them.
        if isinstance(options, str) and "=" not in options:
            options = {"driver": "raw", "file": {"driver": "file", "filename": options}}
        options = to_flat(options)
        options.setdefault("werror", "report")
    backend = open_backend(options, cache=args.cache, read_only=args.read_only)
    services: list[Any] = []
    try:
        parallel = {"auto": None, "on": True, "off": False}[args.parallel_io]
        device: VirtioBlkDevice | None = None
        vhost: VhostUserBlkServer | None = None
        nbd: NbdServer | None = None
        if args.socket:
            device = VirtioBlkDevice(
                backend,
                BlkConfig(
                    num_queues=args.queues,
                    serial=args.serial,
                    logical_block_size=args.logical_block_size,
                    read_only=args.read_only,
                ),
            )
            vhost = VhostUserBlkServer.on_path(
                device, args.socket, num_queues=args.queues, parallel_io=parallel
            )
            services.append(vhost)
        if nbd_addr is not None:
            export = NbdExport(args.nbd_export, backend, writable=not args.read_only)
            nbd = NbdServer(
                nbd_listener(nbd_addr),
                [export],
                name="nbd",
                path=Path(nbd_addr.path) if nbd_addr.type == "unix" else None,
                parallel_io=parallel,
            )
            services.append(nbd)
        control = None
        if control_path is not None:
            control = ControlServer(control_path)
            control.register("stats", lambda _req: _stats(backend, vhost, nbd))
            if device is not None:
                vdev = device
                control.register(
                    "write-cache", lambda req: vdev.write_config(32, bytes([bool(req["enabled"])]))
                )
            else:
                control.register(
                    "write-cache", lambda req: backend.set_write_cache(bool(req["enabled"]))
                )
            register_fault_commands(control, backend)
        if vhost is not None:
            print(f"powercut serve: listening on {args.socket}", flush=True)
        if nbd is not None:
            print(
                f"powercut serve: NBD export {args.nbd_export!r} on {nbd.address}",
                flush=True,
            )
        started, services = services, []
        return run_until_signalled(started, control)
    finally:
        for service in services:  # created but never started (a later step failed)
            service.close()
        backend.close()


def _stats(
    backend: BlockBackend, vhost: VhostUserBlkServer | None, nbd: NbdServer | None
) -> dict[str, Any]:
    out: dict[str, Any] = vhost.stats() if vhost is not None else {}
    if nbd is not None:
        out["nbd"] = nbd.stats()
    if "block" not in out:
        out["block"] = backend.stats().to_dict()
    return out
