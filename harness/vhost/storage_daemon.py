"""`powercut-storage-daemon`: qemu-storage-daemon's command line, served by powercut.

The subset that sets up file/raw nodes and vhost-user-blk exports, so a
script written for qemu-storage-daemon runs by changing only the binary:

    powercut-storage-daemon \\
        --blockdev driver=file,node-name=file0,filename=disk.img,cache.direct=on \\
        --blockdev driver=raw,node-name=disk0,file=file0 \\
        --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\\
addr.path=/tmp/vhost.sock,writable=on,num-queues=2

As qemu-storage-daemon: `--blockdev` and `--export` take the dotted or the
JSON form; a node's `file` may name another node; exports are read-only
unless `writable=on`; `writethrough=on` hides the write cache from the
guest; `addr.type=fd,addr.str=N` serves an inherited listening socket;
several exports may share the process; SIGTERM and SIGINT end it with
status 0. `--object iothread,...` is accepted and ignored (every queue has
its own thread here).
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
from dataclasses import dataclass
from typing import Any

from harness.block.options import parse_bool, parse_dotted
from harness.errors import ConfigError, PowercutError
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.server import VhostUserBlkServer, listen_unix
from harness.vhost.service import run_until_signalled

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


@dataclass(frozen=True)
class ExportSpec:
    id: str
    node_name: str
    addr_type: str
    addr: str
    writable: bool
    writethrough: bool
    num_queues: int
    logical_block_size: int
    serial: str


def parse_export(text: str) -> ExportSpec:
    opts = _parse_spec(text, "--export")
    etype = str(opts.pop("type", ""))
    if etype != "vhost-user-blk":
        raise ConfigError(
            f"--export type={etype or '(missing)'}: only type=vhost-user-blk is "
            "supported by powercut-storage-daemon"
        )
    try:
        export_id = str(opts.pop("id"))
        node = str(opts.pop("node-name"))
        addr_type = str(opts.pop("addr.type"))
    except KeyError as exc:
        raise ConfigError(f"--export needs {exc.args[0]}=...") from None
    if addr_type == "unix":
        addr = str(opts.pop("addr.path", ""))
    elif addr_type == "fd":
        addr = str(opts.pop("addr.str", ""))
    else:
        raise ConfigError(f"--export addr.type={addr_type}: use unix or fd")
    if not addr:
        raise ConfigError(f"--export {export_id}: addr.path / addr.str is missing")
    spec = ExportSpec(
        id=export_id,
        node_name=node,
        addr_type=addr_type,
        addr=addr,
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
        description="qemu-storage-daemon compatible vhost-user-blk exports, "
        "served by the powercut block stack",
    )
    parser.add_argument("--blockdev", action="append", default=[], metavar="SPEC")
    parser.add_argument("--export", action="append", default=[], metavar="SPEC")
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


def _listener(spec: ExportSpec) -> socket.socket:
    if spec.addr_type == "unix":
        return listen_unix(spec.addr)
    try:
        fd = int(spec.addr)
    except ValueError:
        raise ConfigError(
            f"--export {spec.id}: addr.str={spec.addr} is not an fd number "
            "(monitor fd names are not supported)"
        ) from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"--export {spec.id}: fd {fd} is not an inherited socket: {exc}") from exc
    if sock.family != socket.AF_UNIX:
        raise ConfigError(f"--export {spec.id}: fd {fd} is not a unix socket")
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return _run(args)
    except PowercutError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from harness.block import open_backend

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
    if not args.export:
        raise ConfigError("no --export given: nothing to serve")
    exports = [parse_export(text) for text in args.export]
    ids = [e.id for e in exports]
    if len(set(ids)) != len(ids):
        raise ConfigError("two --export options have the same id")
    servers: list[VhostUserBlkServer] = []
    backends = []
    try:
        for spec in exports:
            options = resolve_node(nodes, spec.node_name)
            options.pop("node-name", None)
            for key in [k for k in options if k.endswith(".node-name")]:
                options.pop(key)
            if spec.writethrough:
                options["write-cache"] = "off"
            backend = open_backend(
                options, cache="writeback", read_only=not spec.writable, name=spec.node_name
            )
            backends.append(backend)
            device = VirtioBlkDevice(
                backend,
                BlkConfig(
                    num_queues=spec.num_queues,
                    serial=spec.serial,
                    logical_block_size=spec.logical_block_size,
                    read_only=not spec.writable,
                ),
            )
            path = spec.addr if spec.addr_type == "unix" else None
            servers.append(
                VhostUserBlkServer(
                    device, _listener(spec), num_queues=spec.num_queues, path=path, name=spec.id
                )
            )
        if args.pidfile:
            with open(args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        return run_until_signalled(servers)
    finally:
        for server in servers:
            if server.listener.fileno() >= 0:
                server.close()
        for backend in backends:
            backend.close()
        if args.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pidfile)
