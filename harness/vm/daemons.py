"""What the processes that serve a disk are told: their command lines, built in one place.

Two daemons serve a guest's disk from a child process: `powercut serve`
(this project's block stack, as vhost-user-blk and/or an NBD export) and
qemu-storage-daemon (QEMU's own block layer, as vhost-user-blk). Each has a
frozen options value here whose `argv()` builds its command line by adding
one option after another, so that every caller — the machine layer's disk
backends, the crash sessions, the pytest fixtures, the host benchmark —
says *what* it wants served and never edits another caller's list of words.

`ServeOptions` mirrors `powercut serve`'s own parser (harness/commands/serve.py
reads a command line back into one: a unit test proves the round trip), and
`sockets()` names what exists once the process serves, so whoever starts it
knows when it is ready. The process itself is owned by
`harness.vm.backends.ProcessBackend`.
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from harness.block.cache import cache_settings
from harness.block.options import format_dotted
from harness.block.throttle import BUCKETS
from harness.durability.contract import CacheMode
from harness.errors import ConfigError

QSD = "qemu-storage-daemon"
# `powercut serve`'s throttling options, as QEMU's `throttling.*` keys, in their order.
THROTTLING_KEYS = tuple(key for bucket in BUCKETS for key in (bucket, f"{bucket}-max"))


@dataclass(frozen=True)
class SocketAddress:
    """QEMU's SocketAddress as the daemons take it: unix path, inet host/port, or an fd."""

    type: str  # unix, inet, fd
    path: str = ""
    host: str = ""
    port: int = 0
    fd: int = -1

    def describe(self) -> str:
        if self.type == "unix":
            return self.path
        if self.type == "inet":
            return f"{self.host}:{self.port}"
        return f"fd {self.fd}"


_HOST_PORT = re.compile(r"^\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d{1,5})$")


def nbd_address(text: str) -> SocketAddress:
    """`powercut serve --nbd`: HOST:PORT (or [V6]:PORT) is TCP, anything else a unix path."""
    m = _HOST_PORT.match(text)
    if m and "/" not in text:
        return SocketAddress("inet", host=m["host"], port=int(m["port"]))
    return SocketAddress("unix", path=text)


class ParallelIO(enum.Enum):
    """`powercut serve --parallel-io`: data requests on helper threads."""

    AUTO = "auto"  # only with O_DIRECT (cache none, directsync)
    ON = "on"
    OFF = "off"

    @property
    def setting(self) -> bool | None:
        """The servers' `parallel_io` argument (None: they decide by the graph)."""
        return {ParallelIO.AUTO: None, ParallelIO.ON: True, ParallelIO.OFF: False}[self]


@dataclass(frozen=True)
class ServeOptions:
    """One `powercut serve` process: what it serves, where, and how.

    Exactly one of `image` (a raw file) and `blockdev` (a `--blockdev`
    description, dotted or JSON: fault drivers and all); at least one of
    `socket` (vhost-user-blk) and `nbd` (a unix socket path or HOST:PORT).
    The control socket is `control_path`, or by default next to the
    vhost-user socket (else next to a unix NBD socket); `control=False` has
    none. `extra_args` go last, for options a caller passes through as they
    are (a benchmark's environment).
    """

    image: Path | None = None
    blockdev: str | None = None
    socket: Path | None = None
    nbd: str | None = None
    nbd_export: str = "disk"
    cache: CacheMode = CacheMode.WRITEBACK
    queues: int = 1
    read_only: bool = False
    serial: str = ""
    logical_block_size: int = 512
    control: bool = True
    control_path: Path | None = None
    parallel_io: ParallelIO = ParallelIO.AUTO
    throttling: tuple[tuple[str, str], ...] = ()  # (`throttling.` key, value), e.g. iops-total
    throttle_group: str = ""
    verbose: int = 0  # -v: info logging (connections, resubmissions, refusals); -vv: debug
    extra_args: tuple[str, ...] = ()

    program: ClassVar[str] = "powercut-serve"

    def __post_init__(self) -> None:
        if self.socket is None and self.nbd is None:
            raise ConfigError(
                "nothing to serve: give --socket PATH (vhost-user-blk), --nbd ADDR, or both"
            )
        if (self.image is None) == (self.blockdev is None):
            raise ConfigError("give either an IMAGE or --blockdev SPEC (exactly one)")
        if not isinstance(self.cache, CacheMode):
            raise ConfigError(f"cache must be a CacheMode, not {self.cache!r}")
        if not self.control and self.control_path is not None:
            raise ConfigError("a control socket path with control=False: give one or the other")
        unknown = sorted({key for key, _ in self.throttling} - set(THROTTLING_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown throttling option(s) {', '.join(unknown)}; known: "
                + ", ".join(THROTTLING_KEYS)
            )
        # Paths as Paths, the NBD address as the words it is given in, limits in the
        # parser's order: two options that say the same are equal.
        for name in ("image", "socket", "control_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.nbd is not None and not isinstance(self.nbd, str):
            object.__setattr__(self, "nbd", str(self.nbd))
        limits = dict(self.throttling)
        ordered = tuple((k, str(limits[k])) for k in THROTTLING_KEYS if k in limits)
        object.__setattr__(self, "throttling", ordered)
        object.__setattr__(self, "extra_args", tuple(self.extra_args))

    # -- where it serves ---------------------------------------------------------------

    @property
    def nbd_socket(self) -> Path | None:
        """The NBD export's unix socket (None for TCP or no NBD)."""
        if self.nbd is None:
            return None
        addr = nbd_address(self.nbd)
        return Path(addr.path) if addr.type == "unix" else None

    @property
    def control_socket(self) -> Path | None:
        """Where the control socket will be (None: there is none)."""
        if not self.control:
            return None
        if self.control_path is not None:
            return self.control_path
        served = self.socket if self.socket is not None else self.nbd_socket
        return Path(f"{served}.ctl") if served is not None else None

    def sockets(self) -> tuple[Path, ...]:
        """The unix sockets that exist once the process serves (the control one last)."""
        found = (self.socket, self.nbd_socket, self.control_socket)
        return tuple(p for p in found if p is not None)

    @property
    def nbd_uri(self) -> str:
        """The NBD export as a URI for qemu-img, qemu-io, nbdinfo."""
        addr = nbd_address(self.nbd or "")
        if addr.type == "unix":
            return f"nbd+unix:///{self.nbd_export}?socket={addr.path}"
        return f"nbd://{addr.host}:{addr.port}/{self.nbd_export}"

    def nbd_blockdev(self, node_name: str = "nbd0") -> dict[str, Any]:
        """QEMU's `-blockdev` for the protocol node on the NBD export (nested options)."""
        addr = nbd_address(self.nbd or "")
        server: dict[str, Any] = (
            {"type": "unix", "path": addr.path}
            if addr.type == "unix"
            else {"type": "inet", "host": addr.host, "port": str(addr.port)}
        )
        return {
            "driver": "nbd",
            "node-name": node_name,
            "server": server,
            "export": self.nbd_export,
        }

    # -- the command line -------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "harness.cli", *["-v"] * self.verbose, "serve"]
        if self.blockdev is not None:
            argv += ["--blockdev", self.blockdev]
        else:
            argv.append(str(self.image))
        # What is served, then how; a default is spelled out only where it applies.
        if self.socket is not None:
            argv += ["--socket", str(self.socket)]
        if self.socket is not None or self.queues != 1:
            argv += ["--queues", str(self.queues)]
        if self.nbd is not None:
            argv += ["--nbd", self.nbd]
        if self.nbd is not None or self.nbd_export != "disk":
            argv += ["--nbd-export", self.nbd_export]
        argv += ["--cache", self.cache.value]
        if self.read_only:
            argv.append("--read-only")
        if self.serial:
            argv += ["--serial", self.serial]
        if self.logical_block_size != 512:
            argv += ["--logical-block-size", str(self.logical_block_size)]
        if not self.control:
            argv.append("--no-control")
        elif self.control_path is not None:
            argv += ["--control", str(self.control_path)]
        if self.parallel_io is not ParallelIO.AUTO:
            argv += ["--parallel-io", self.parallel_io.value]
        for key, value in self.throttling:
            argv += [f"--{key}", value]
        if self.throttle_group:
            argv += ["--throttle-group", self.throttle_group]
        return argv + list(self.extra_args)


@dataclass(frozen=True)
class QsdOptions:
    """One qemu-storage-daemon: a node graph and its one vhost-user-blk export.

    `blockdevs` are `--blockdev` descriptions as nested dicts, children
    before their parents, each with its `node-name`; `node_name` is the node
    exported on the unix socket `socket`. The export's write cache is
    QEMU's `writethrough` turned around.
    """

    blockdevs: tuple[Mapping[str, Any], ...]
    node_name: str
    socket: Path
    writable: bool = True
    write_cache: bool = True
    queues: int = 1

    program: ClassVar[str] = QSD
    control_socket: ClassVar[Path | None] = None

    @classmethod
    def on_image(
        cls,
        image: Path,
        socket: Path,
        cache: CacheMode,
        *,
        read_only: bool = False,
        queues: int = 1,
        node_name: str = "disk0",
    ) -> QsdOptions:
        """A raw image file in `cache` mode, as QEMU's reference vhost-user-blk export."""
        s = cache_settings(cache)
        file_node = {
            "driver": "file",
            "filename": str(image),
            "node-name": "file0",
            "read-only": read_only,
            "cache": {"direct": s.direct, "no-flush": s.no_flush},
        }
        raw = {"driver": "raw", "file": "file0", "node-name": node_name, "read-only": read_only}
        return cls(
            (file_node, raw),
            node_name,
            Path(socket),
            writable=not read_only,
            write_cache=s.write_cache,
            queues=queues,
        )

    def sockets(self) -> tuple[Path, ...]:
        return (self.socket,)

    def argv(self) -> list[str]:
        argv = [self.program]
        for node in self.blockdevs:
            argv += ["--blockdev", format_dotted(node)]
        export = {
            "type": "vhost-user-blk",
            "id": "export0",
            "node-name": self.node_name,
            "addr": {"type": "unix", "path": str(self.socket)},
            "writable": self.writable,
            "writethrough": not self.write_cache,
            "num-queues": self.queues,
        }
        return [*argv, "--export", format_dotted(export)]


DaemonOptions = ServeOptions | QsdOptions
