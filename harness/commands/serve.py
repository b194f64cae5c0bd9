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
from pathlib import Path
from typing import Any

from harness.block import BlockBackend, open_backend
from harness.block.cache import parse_cache_mode
from harness.block.options import format_dotted, to_flat
from harness.block.throttle import BUCKETS
from harness.control import ControlServer
from harness.nbd import NbdServer
from harness.storage_daemon import Exports, ExportSpec, NbdExportSpec, NbdServerSpec, open_exports
from harness.vhost.fault_commands import register_fault_commands
from harness.vhost.server import VhostUserBlkServer
from harness.vhost.service import run_until_signalled
from harness.vm.daemons import THROTTLING_KEYS, ParallelIO, ServeOptions, nbd_address

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


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The command line read back into the options that build it (`ServeOptions.argv`)."""
    limits = (
        (key, getattr(args, key.replace("-", "_")))
        for key in THROTTLING_KEYS
        if getattr(args, key.replace("-", "_")) is not None
    )
    return ServeOptions(
        image=Path(args.image) if args.image else None,
        blockdev=args.blockdev or None,
        socket=Path(args.socket) if args.socket else None,
        nbd=args.nbd or None,
        nbd_export=args.nbd_export,
        cache=parse_cache_mode(args.cache),
        queues=args.queues,
        read_only=args.read_only,
        serial=args.serial,
        logical_block_size=args.logical_block_size,
        control=not args.no_control,
        control_path=Path(args.control) if args.control else None,
        parallel_io=ParallelIO(args.parallel_io),
        throttling=tuple(limits),
        throttle_group=args.throttle_group or "",
        verbose=getattr(args, "verbose", 0),  # the dispatcher's -v, before `serve`
    )


def graph_options(options: ServeOptions) -> dict[str, Any] | str:
    """The served graph's options: IMAGE as raw on a file, or the --blockdev, throttled."""
    extra: dict[str, Any] = {f"throttling.{key}": value for key, value in options.throttling}
    if options.throttle_group:
        extra["throttling.group"] = options.throttle_group
    if options.blockdev is not None:
        spec = options.blockdev
        if extra:
            spec += "," + format_dotted(extra)
        return spec
    # IMAGE is always a file name, whatever it holds ('=' and ',' included), never options.
    return {"driver": "raw", "file": {"driver": "file", "filename": str(options.image)}, **extra}


def run(args: argparse.Namespace) -> int:
    return serve(serve_options(args))


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM or SIGINT (exit status 0)."""
    graph = graph_options(options)
    if options.socket is None:
        # Only NBD clients: each is told its errors and applies its own werror policy
        # (QEMU's export BlockBackends report); a stopped backend would only fail them.
        if isinstance(graph, str) and "=" not in graph:
            graph = {"driver": "raw", "file": {"driver": "file", "filename": graph}}
        graph = to_flat(graph)
        graph.setdefault("werror", "report")
    backend = open_backend(graph, cache=options.cache, read_only=options.read_only)
    exports = Exports()
    try:
        writable = not options.read_only
        vhost = []
        if options.socket is not None:
            path = str(options.socket)
            spec = ExportSpec(
                id=path,
                node_name="",
                addr_type="unix",
                addr=path,
                writable=writable,
                writethrough=False,  # the cache mode is the graph's own
                num_queues=options.queues,
                logical_block_size=options.logical_block_size,
                serial=options.serial,
            )
            vhost.append((spec, backend))
        nbd_server = None
        nbd = []
        if options.nbd is not None:
            nbd_server = NbdServerSpec(nbd_address(options.nbd), max_connections=0)
            nspec = NbdExportSpec(
                id="nbd",
                node_name="",
                name=options.nbd_export,
                description="",
                writable=writable,
                writethrough=False,
                multi_conn="auto",
            )
            nbd.append((nspec, backend))
        exports = open_exports(
            vhost, nbd_server, nbd, parallel_io=options.parallel_io.setting, nbd_name="nbd"
        )
        control = _control(options, backend, exports)
        for server in exports.vhost:
            print(f"powercut serve: listening on {server.path}", flush=True)
        if exports.nbd is not None:
            print(
                f"powercut serve: NBD export {options.nbd_export!r} on {exports.nbd.address}",
                flush=True,
            )
        started, exports = exports, Exports()
        return run_until_signalled(started.servers, control)
    finally:
        exports.close()  # created but never started (a later step failed)
        backend.close()


def _control(
    options: ServeOptions, backend: BlockBackend, exports: Exports
) -> ControlServer | None:
    """The control socket: stats, the write cache, and the fault drivers' commands."""
    path = options.control_socket
    if path is None:
        return None
    control = ControlServer(path)
    vhost = exports.vhost[0] if exports.vhost else None
    control.register("stats", lambda _req: _stats(backend, vhost, exports.nbd))
    if vhost is not None:
        device = vhost.device
        control.register(
            "write-cache", lambda req: device.write_config(32, bytes([bool(req["enabled"])]))
        )
    else:
        control.register("write-cache", lambda req: backend.set_write_cache(bool(req["enabled"])))
    register_fault_commands(control, backend)
    return control


def _stats(
    backend: BlockBackend, vhost: VhostUserBlkServer | None, nbd: NbdServer | None
) -> dict[str, Any]:
    out: dict[str, Any] = vhost.stats() if vhost is not None else {}
    if nbd is not None:
        out["nbd"] = nbd.stats()
    if "block" not in out:
        out["block"] = backend.stats().to_dict()
    return out
