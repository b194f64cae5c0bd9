"""`powercut serve`: the block stack as a vhost-user-blk backend for any QEMU or libvirt guest.

    powercut serve disk.img --socket /run/pc/vda.sock --cache none --queues 2
    powercut serve --blockdev driver=raw,file.driver=file,file.filename=d.img --socket s.sock

QEMU side: -chardev socket,id=c,path=SOCK,reconnect=1
           -device vhost-user-blk-pci,chardev=c,num-queues=N
(guest memory must be shared: -object memory-backend-memfd,share=on).
A JSON-lines control socket (default SOCK.ctl) answers {"cmd": "stats"} and, for
fault-driver graphs, the commands in harness/vhost/fault_commands.py.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from harness.block import open_backend
from harness.block.throttle import BUCKETS
from harness.errors import ConfigError
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.control import ControlServer
from harness.vhost.fault_commands import register_fault_commands
from harness.vhost.server import VhostUserBlkServer
from harness.vhost.service import run_until_signalled

NAME = "serve"
HELP = "serve a disk image to QEMU guests as a vhost-user-blk backend"

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
        required=True,
        metavar="PATH",
        help="vhost-user socket to listen on (created owner-only)",
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
        "--control", metavar="PATH", help="control socket (JSON lines; default SOCKET.ctl)"
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
            spec += "," + ",".join(f"{k}={v}" for k, v in extra.items())
        return spec
    if not extra:
        return str(args.image)
    return {
        "driver": "raw",
        "file": {"driver": "file", "filename": args.image},
        **{k: v for k, v in extra.items()},
    }


def run(args: argparse.Namespace) -> int:
    backend = open_backend(_options(args), cache=args.cache, read_only=args.read_only)
    try:
        device = VirtioBlkDevice(
            backend,
            BlkConfig(
                num_queues=args.queues,
                serial=args.serial,
                logical_block_size=args.logical_block_size,
                read_only=args.read_only,
            ),
        )
        parallel = {"auto": None, "on": True, "off": False}[args.parallel_io]
        server = VhostUserBlkServer.on_path(
            device, args.socket, num_queues=args.queues, parallel_io=parallel
        )
        control = None
        if not args.no_control:
            control = ControlServer(args.control or f"{args.socket}.ctl")
            control.register("stats", lambda _req: server.stats())
            control.register(
                "write-cache", lambda req: device.write_config(32, bytes([bool(req["enabled"])]))
            )
            register_fault_commands(control, backend)
        print(f"powercut serve: listening on {args.socket}", flush=True)
        return run_until_signalled([server], control)
    finally:
        backend.close()
