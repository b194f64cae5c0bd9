"""`powercut-storage-daemon`: qemu-storage-daemon's command line, served by powercut.

The subset that sets up node graphs and vhost-user-blk or NBD exports, so a
script written for qemu-storage-daemon runs by changing only the binary:

    powercut-storage-daemon \\
        --blockdev driver=file,node-name=file0,filename=disk.img,cache.direct=on \\
        --blockdev driver=raw,node-name=disk0,file=file0 \\
        --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\\
addr.path=/tmp/vhost.sock,writable=on,num-queues=2

    powercut-storage-daemon \\
        --blockdev driver=log-writes,node-name=disk0,log=w.log,file.driver=powerfail,...\\
        --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock \\
        --export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on
    # then: qemu-io -f raw 'nbd+unix:///disk0?socket=/tmp/nbd.sock'

As qemu-storage-daemon: `--blockdev`, `--nbd-server` and `--export` take the
dotted or the JSON form; a node's `file` may name another node; exports are
read-only unless `writable=on`; `writethrough=on` hides the write cache
(every write is then FUA in the graph); `addr.type=fd,addr.str=N` serves an
inherited listening socket; several exports may share the process, and
all NBD exports share the one `--nbd-server` (an NBD export's `name`
defaults to its node-name; `max-connections` limits clients, 0 = no limit).
SIGTERM and SIGINT end it with status 0. `--object iothread,...` is accepted
and ignored (every queue and NBD client has its own thread here). Not
supported: TLS (`tls-creds`), dirty bitmaps, and other export types.

Each export opens its own graph from the node definitions, as in the
vhost-user case before; give each exported graph its own files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.block.options import parse_bool, parse_dotted
from harness.errors import ConfigError, PowercutError
from harness.sockets import listen_unix
from harness.vm.daemons import SocketAddress

if TYPE_CHECKING:
    from harness.block import BlockBackend
    from harness.nbd import NbdServer
    from harness.vhost.server import VhostUserBlkServer

log = logging.getLogger(__name__)

PROG = "powercut-storage-daemon"
_NODE_KEYS = ("node-name",)


def _parse_spec(text: str, what: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}: invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: JSON must be an object")
        return _flatten_json(value)
    return dict(parse_dotted(text))


def _flatten_json(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            flat.update(_flatten_json(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _parse_addr(opts: dict[str, Any], what: str, types: tuple[str, ...]) -> SocketAddress:
    addr_type = str(opts.pop("addr.type", ""))
    if not addr_type:
        raise ConfigError(f"{what} needs addr.type=... ({' or '.join(types)})")
    if addr_type not in types:
        raise ConfigError(f"{what} addr.type={addr_type}: use {' or '.join(types)}")
    if addr_type == "unix":
        path = str(opts.pop("addr.path", ""))
        if not path:
            raise ConfigError(f"{what}: addr.path is missing")
        return SocketAddress("unix", path=path)
    if addr_type == "inet":
        host = str(opts.pop("addr.host", ""))
        port = str(opts.pop("addr.port", ""))
        if not host or not port:
            raise ConfigError(f"{what}: addr.type=inet needs addr.host and addr.port")
        for key in [k for k in opts if k.startswith("addr.")]:
            if key in ("addr.ipv4", "addr.ipv6", "addr.numeric", "addr.to", "addr.keep-alive"):
                opts.pop(key)
        try:
            return SocketAddress("inet", host=host, port=int(port))
        except ValueError:
            raise ConfigError(f"{what}: addr.port={port} is not a port number") from None
    text = str(opts.pop("addr.str", ""))
    if not text:
        raise ConfigError(f"{what}: addr.str is missing")
    try:
        return SocketAddress("fd", fd=int(text))
    except ValueError:
        raise ConfigError(
            f"{what}: addr.str={text} is not an fd number (monitor fd names are not supported)"
        ) from None


@dataclass(frozen=True)
class ExportSpec:
    """A `--export type=vhost-user-blk`."""

    id: str
    node_name: str
    addr_type: str
    addr: str
    writable: bool
    writethrough: bool
    num_queues: int
    logical_block_size: int
    serial: str


@dataclass(frozen=True)
class NbdExportSpec:
    """A `--export type=nbd`: served by the one `--nbd-server`."""

    id: str
    node_name: str
    name: str
    description: str
    writable: bool
    writethrough: bool
    multi_conn: str


@dataclass(frozen=True)
class NbdServerSpec:
    """The `--nbd-server`."""

    addr: SocketAddress
    max_connections: int


def _export_common(opts: dict[str, Any]) -> tuple[str, str]:
    try:
        return str(opts.pop("id")), str(opts.pop("node-name"))
    except KeyError as exc:
        raise ConfigError(f"--export needs {exc.args[0]}=...") from None


def parse_export(text: str) -> ExportSpec | NbdExportSpec:
    opts = _parse_spec(text, "--export")
    etype = str(opts.pop("type", ""))
    if etype == "nbd":
        return _parse_nbd_export(opts)
    if etype != "vhost-user-blk":
        raise ConfigError(
            f"--export type={etype or '(missing)'}: powercut-storage-daemon supports "
            "type=vhost-user-blk and type=nbd"
        )
    export_id, node = _export_common(opts)
    addr = _parse_addr(opts, f"--export {export_id}", ("unix", "fd"))
    spec = ExportSpec(
        id=export_id,
        node_name=node,
        addr_type=addr.type,
        addr=addr.path if addr.type == "unix" else str(addr.fd),
        writable=parse_bool(opts.pop("writable", "off"), "writable"),
        writethrough=parse_bool(opts.pop("writethrough", "off"), "writethrough"),
        num_queues=int(opts.pop("num-queues", 1)),
        logical_block_size=int(opts.pop("logical-block-size", 512)),
        serial=str(opts.pop("serial", "")),
    )
    opts.pop("iothread", None)  # accepted: every queue has its own thread here
    if opts:
        raise ConfigError(f"--export {export_id}: unsupported option(s) {', '.join(sorted(opts))}")
    return spec


def _parse_nbd_export(opts: dict[str, Any]) -> NbdExportSpec:
    export_id, node = _export_common(opts)
    multi_conn = str(opts.pop("multi-conn", "auto"))
    if multi_conn not in ("on", "off", "auto"):
        raise ConfigError(f"--export {export_id}: multi-conn={multi_conn}: use on, off or auto")
    spec = NbdExportSpec(
        id=export_id,
        node_name=node,
        name=str(opts.pop("name", node)),
        description=str(opts.pop("description", "")),
        writable=parse_bool(opts.pop("writable", "off"), "writable"),
        writethrough=parse_bool(opts.pop("writethrough", "off"), "writethrough"),
        multi_conn=multi_conn,
    )
    for accepted in ("iothread", "fixed-iothread"):  # every client has its own thread
        opts.pop(accepted, None)
    if "bitmaps" in opts or "bitmap" in opts or "allocation-depth" in opts:
        raise ConfigError(
            f"--export {export_id}: dirty bitmaps and allocation-depth are not supported "
            "by powercut's NBD export"
        )
    if opts:
        raise ConfigError(f"--export {export_id}: unsupported option(s) {', '.join(sorted(opts))}")
    return spec


def parse_nbd_server(text: str) -> NbdServerSpec:
    opts = _parse_spec(text, "--nbd-server")
    addr = _parse_addr(opts, "--nbd-server", ("unix", "inet", "fd"))
    for tls in ("tls-creds", "tls-authz"):
        if tls in opts:
            raise ConfigError(f"--nbd-server {tls}=...: TLS is not supported by powercut's NBD")
    try:
        max_connections = int(opts.pop("max-connections", 0))
    except ValueError:
        raise ConfigError("--nbd-server max-connections must be a number") from None
    if max_connections < 0:
        raise ConfigError("--nbd-server max-connections must be 0 (no limit) or more")
    if opts:
        raise ConfigError(f"--nbd-server: unsupported option(s) {', '.join(sorted(opts))}")
    return NbdServerSpec(addr, max_connections)


def resolve_node(
    nodes: Mapping[str, dict[str, Any]], name: str, seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A node's options with child references (`file=NODE`) replaced by that node's options."""
    if name in seen:
        raise ConfigError(f"--blockdev node {name!r} refers to itself through {seen}")
    if name not in nodes:
        raise ConfigError(f"no --blockdev with node-name={name}; define it before exporting it")
    own = dict(nodes[name])
    child = own.get("file")
    if isinstance(child, str) and child in nodes:
        own.pop("file")
        for key, value in resolve_node(nodes, child, (*seen, name)).items():
            own[f"file.{key}"] = value
    return own


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="qemu-storage-daemon compatible vhost-user-blk and NBD exports, "
        "served by the powercut block stack",
    )
    parser.add_argument("--blockdev", action="append", default=[], metavar="SPEC")
    parser.add_argument("--export", action="append", default=[], metavar="SPEC")
    parser.add_argument(
        "--nbd-server",
        action="append",
        default=[],
        metavar="SPEC",
        help="addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N | "
        "addr.type=fd,addr.str=N [,max-connections=N]",
    )
    parser.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="SPEC",
        help="accepted for compatibility (iothread objects are ignored)",
    )
    parser.add_argument("--pidfile", metavar="PATH")
    parser.add_argument("-T", "--trace", action="append", default=[], help="ignored")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} (powercut)")
    return parser


def _inherited(fd: int, what: str, family: socket.AddressFamily | None) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"{what}: fd {fd} is not an inherited socket: {exc}") from exc
    if family is not None and sock.family != family:
        raise ConfigError(f"{what}: fd {fd} is not a unix socket")
    return sock


def _listener(spec: ExportSpec) -> socket.socket:
    if spec.addr_type == "unix":
        return listen_unix(spec.addr)
    return _inherited(int(spec.addr), f"--export {spec.id}", socket.AF_UNIX)


def nbd_listener(addr: SocketAddress) -> socket.socket:
    """A listening socket for an NBD server (unix: owner-only, as the vhost sockets)."""
    if addr.type == "unix":
        return listen_unix(addr.path)
    if addr.type == "inet":
        try:
            return socket.create_server((addr.host, addr.port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(
                f"--nbd-server: cannot listen on {addr.host}:{addr.port}: {exc.strerror}; "
                "is another server there? pick another addr.port"
            ) from exc
    return _inherited(addr.fd, "--nbd-server", None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return _run(args)
    except PowercutError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _open_export_backend(
    nodes: Mapping[str, dict[str, Any]],
    node_name: str,
    writable: bool,
    writethrough: bool,
    *,
    report_errors: bool = False,
) -> BlockBackend:
    """`report_errors`: werror=report, as QEMU's export BlockBackends have (an NBD client
    is told each error and applies its own policy; a stopped export would only fail)."""
    from harness.block import open_backend

    options = resolve_node(nodes, node_name)
    options.pop("node-name", None)
    for key in [k for k in options if k.endswith(".node-name")]:
        options.pop(key)
    if writethrough:
        options["write-cache"] = "off"
    if report_errors:
        options.setdefault("werror", "report")
    return open_backend(options, cache="writeback", read_only=not writable, name=node_name)


@dataclass
class Exports:
    """The servers one process runs: its vhost-user-blk exports and its one NBD server."""

    vhost: list[VhostUserBlkServer] = field(default_factory=list)
    nbd: NbdServer | None = None

    @property
    def servers(self) -> list[VhostUserBlkServer | NbdServer]:
        return [*self.vhost, *([self.nbd] if self.nbd is not None else [])]

    def close(self) -> None:
        """Close every server still listening (created but never run, or run and stopped)."""
        for server in self.servers:
            if server.listener.fileno() >= 0:
                server.close()


def open_exports(
    vhost: Sequence[tuple[ExportSpec, BlockBackend]],
    nbd_server: NbdServerSpec | None = None,
    nbd: Sequence[tuple[NbdExportSpec, BlockBackend]] = (),
    *,
    parallel_io: bool | None = None,
    nbd_name: str = "nbd-server",
) -> Exports:
    """Each backend wired to its exports, listening (not yet serving: `run_until_signalled`).

    The one place a BlockBackend becomes a virtio-blk device on a vhost-user
    socket or an NBD export: `powercut serve` and this daemon both come here.
    The backends stay the caller's. If one export cannot listen, the ones
    made before are closed.
    """
    from harness.nbd import MultiConn, NbdExport, NbdServer
    from harness.vhost.blk import BlkConfig, VirtioBlkDevice
    from harness.vhost.server import VhostUserBlkServer

    exports = Exports()
    try:
        for spec, backend in vhost:
            device = VirtioBlkDevice(
                backend,
                BlkConfig(
                    num_queues=spec.num_queues,
                    serial=spec.serial,
                    logical_block_size=spec.logical_block_size,
                    read_only=not spec.writable,
                ),
            )
            exports.vhost.append(
                VhostUserBlkServer(
                    device,
                    _listener(spec),
                    num_queues=spec.num_queues,
                    path=spec.addr if spec.addr_type == "unix" else None,
                    name=spec.id,
                    parallel_io=parallel_io,
                )
            )
        if nbd_server is not None:
            items = [
                NbdExport(
                    nspec.name,
                    backend,
                    writable=nspec.writable,
                    description=nspec.description,
                    multi_conn=MultiConn(nspec.multi_conn),
                )
                for nspec, backend in nbd
            ]
            addr = nbd_server.addr
            exports.nbd = NbdServer(
                nbd_listener(addr),
                items,
                name=nbd_name,
                path=Path(addr.path) if addr.type == "unix" else None,
                max_connections=nbd_server.max_connections,
                parallel_io=parallel_io,
            )
            log.info("NBD server on %s", addr.describe())
    except BaseException:
        exports.close()
        raise
    return exports


def _run(args: argparse.Namespace) -> int:
    from harness.vhost.service import run_until_signalled

    for obj in args.object:
        log.info("ignoring --object %s", obj)
    nodes: dict[str, dict[str, Any]] = {}
    for text in args.blockdev:
        opts = _parse_spec(text, "--blockdev")
        name = opts.get("node-name")
        if not name:
            raise ConfigError(f"--blockdev {text}: node-name is required")
        if name in nodes:
            raise ConfigError(f"--blockdev node-name={name} is defined twice")
        nodes[str(name)] = opts
    if len(args.nbd_server) > 1:
        raise ConfigError("--nbd-server given twice: one NBD server serves every NBD export")
    nbd_spec = parse_nbd_server(args.nbd_server[0]) if args.nbd_server else None
    if not args.export:
        raise ConfigError("no --export given: nothing to serve")
    specs = [parse_export(text) for text in args.export]
    ids = [e.id for e in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError("two --export options have the same id")
    nbd_specs = [e for e in specs if isinstance(e, NbdExportSpec)]
    if nbd_specs and nbd_spec is None:
        raise ConfigError(
            f"--export {nbd_specs[0].id} is type=nbd but no --nbd-server was given; "
            "add --nbd-server addr.type=unix,addr.path=SOCKET"
        )
    for nbd_export in nbd_specs:
        resolve_node(nodes, nbd_export.node_name)  # a missing node fails before anything listens
    backends: list[BlockBackend] = []
    exports = Exports()
    try:
        vhost = []
        for spec in specs:
            if isinstance(spec, ExportSpec):
                backend = _open_export_backend(
                    nodes, spec.node_name, spec.writable, spec.writethrough
                )
                backends.append(backend)
                vhost.append((spec, backend))
        nbd = []
        for nspec in nbd_specs:
            backend = _open_export_backend(
                nodes, nspec.node_name, nspec.writable, nspec.writethrough, report_errors=True
            )
            backends.append(backend)
            nbd.append((nspec, backend))
        exports = open_exports(vhost, nbd_spec, nbd)
        if args.pidfile:
            with open(args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        return run_until_signalled(exports.servers)
    finally:
        exports.close()
        for backend in backends:
            backend.close()
        if args.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pidfile)


if __name__ == "__main__":
    sys.exit(main())
