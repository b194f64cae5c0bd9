"""Where a guest's disk is served from: one vocabulary, one process that serves it.

`Backend` says whose block layer serves a disk, in scenarios, `powercut vm`
and `powercut bench` alike: `qemu` is QEMU's own (its virtio-blk on the file,
or its raw/qcow2 driver over NBD in a crash cell; `builtin` is the old name
`powercut vm` still takes), `qemu-storage-daemon` QEMU's reference
vhost-user-blk export, `powercut` this project's block stack behind
`powercut serve`.

A `DiskBackend` turns an image into the `Disk` a MachineSpec attaches and
owns whatever serves it. Every disk served from a child process — `powercut
serve` as vhost-user-blk and/or NBD, qemu-storage-daemon — is one
`ProcessBackend` on the options that say what to serve
(`harness.vm.daemons`): it starts the process, waits until its sockets exist,
freezes it (a host power cut), kills it (a backend crash), stops it, keeps
its log and sends its control requests.
"""

from __future__ import annotations

import abc
import enum
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from harness.block.cache import CacheMode
from harness.block.options import format_dotted
from harness.control import control_request
from harness.errors import ConfigError
from harness.proc import ManagedProcess
from harness.vm.daemons import QsdOptions, ServeOptions
from harness.vm.spec import BlockdevDisk, Disk, FileDisk, VhostUserDisk

log = logging.getLogger(__name__)


class Backend(enum.Enum):
    """Whose block layer serves a guest's disk."""

    POWERCUT = "powercut"  # this project's stack reproduces QEMU's cache modes (vhost-user-blk)
    QEMU = "qemu"  # QEMU's own: virtio-blk on the file, or raw/qcow2 over NBD to a powercut disk
    QSD = "qemu-storage-daemon"  # QEMU's block layer in qsd, exported as vhost-user-blk

    @classmethod
    def parse(cls, name: Backend | str) -> Backend:
        """A backend by its name, or by an alias a command line took (`builtin`)."""
        if isinstance(name, Backend):
            return name
        if name in BACKEND_ALIASES:
            return BACKEND_ALIASES[name]
        try:
            return cls(name)
        except ValueError:
            raise ConfigError(
                f"unknown disk backend {name!r}; choose one of {', '.join(backend_names())}"
            ) from None


BACKEND_ALIASES = {"builtin": Backend.QEMU}  # `powercut vm --backend builtin`, `powercut bench`


def backend_names() -> list[str]:
    """Every name `Backend.parse` accepts, aliases last (for choices and messages)."""
    return [b.value for b in Backend] + list(BACKEND_ALIASES)


class DiskBackend(abc.ABC):
    """Serves one image as one guest disk."""

    @abc.abstractmethod
    def start(self) -> Disk:
        """Start serving; the Disk to put into the MachineSpec."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving (idempotent)."""

    def logs(self) -> dict[str, Path]:
        return {}

    def __enter__(self) -> DiskBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class QemuBackend(DiskBackend):
    """QEMU's own virtio-blk on the image file, in a cache mode: nothing else runs."""

    def __init__(self, image: Path, cache: CacheMode, read_only: bool = False) -> None:
        self.image = Path(image)
        self.cache = cache
        self.read_only = read_only

    def start(self) -> Disk:
        return FileDisk(self.image, self.cache, self.read_only)

    def stop(self) -> None:
        """Nothing to stop: QEMU itself serves the disk."""


Options = TypeVar("Options", ServeOptions, QsdOptions)


class ProcessBackend(DiskBackend, Generic[Options]):
    """A disk served by a child process on unix sockets: `powercut serve` or qemu-storage-daemon.

    `start()` may be called again after `kill()` (a backend crash: QEMU
    redials the vhost-user socket) or `stop()`.
    """

    def __init__(
        self,
        options: Options,
        *,
        name: str,
        log_path: Path,
        reconnect: int = 1,
        ready_timeout: float = 30.0,
    ) -> None:
        self.options: Options = options
        self.name = name
        self.log_path = Path(log_path)
        self.reconnect = reconnect
        self.ready_timeout = ready_timeout
        self.proc: ManagedProcess | None = None

    @classmethod
    def logging_in(
        cls, options: Options, directory: Path, name: str, reconnect: int = 1
    ) -> ProcessBackend[Options]:
        """A backend whose log is DIRECTORY/NAME-PROGRAM.log (NAME-powercut-serve.log)."""
        log_path = Path(directory) / f"{name}-{options.program}.log"
        return cls(options, name=name, log_path=log_path, reconnect=reconnect)

    @property
    def socket(self) -> Path | None:
        """The vhost-user socket (None: the process serves NBD only)."""
        return self.options.socket

    @property
    def control_path(self) -> Path | None:
        return self.options.control_socket

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def argv(self) -> list[str]:
        return self.options.argv()

    def start(self) -> Disk:
        """Start the process and wait until every socket it serves on exists."""
        program = self.options.program
        if self.running:
            raise ConfigError(f"{program} {self.name} is already running")
        sockets: tuple[Path, ...] = self.options.sockets()
        for path in (*sockets, self.log_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        for path in sockets:
            path.unlink(missing_ok=True)
        self.proc = ManagedProcess(
            self.options.argv(),
            name=f"{program}-{self.name}",
            log_path=self.log_path,
            stop_signal=signal.SIGTERM,
            stop_timeout=10.0,
        )
        self.proc.start()
        self.proc.wait_for(
            lambda: all(p.exists() for p in sockets),
            self.ready_timeout,
            f"{program} sockets {', '.join(map(str, sockets))}",
        )
        return self.disk()

    def disk(self) -> Disk:
        """What a guest attaches: the vhost-user socket, else QEMU's NBD client on the export."""
        if self.options.socket is not None:
            return VhostUserDisk(
                self.options.socket, reconnect=self.reconnect, num_queues=self.options.queues
            )
        assert isinstance(self.options, ServeOptions)  # qemu-storage-daemon has its socket
        node = "nbd0"
        return BlockdevDisk((format_dotted(self.options.nbd_blockdev(node)),), node)

    def freeze(self) -> None:
        """SIGSTOP where it stands: a host power cut stops it mid-request."""
        if self.running:
            assert self.proc is not None
            self.proc.signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL and reap (a backend crash; after freeze(), the cut is complete)."""
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        """SIGTERM (the graph is flushed and closed, as QEMU's bdrv_close), then reap."""
        if self.proc is not None:
            self.proc.stop()
        for path in self.options.sockets():
            path.unlink(missing_ok=True)

    def logs(self) -> dict[str, Path]:
        return {f"{self.name} {self.options.program}": self.log_path}

    def control(self, cmd: str, *, timeout: float = 10.0, **fields: Any) -> Any:
        """One request on the control socket (`harness.control`); its result."""
        if self.control_path is None:
            raise ConfigError(f"{self.options.program} {self.name} has no control socket")
        return control_request(self.control_path, {"cmd": cmd, **fields}, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("stats", timeout=5.0)
        return result


def _qemu(image: Path, workdir: Path, name: str, **settings: Any) -> DiskBackend:
    return QemuBackend(image, settings["cache"], settings["read_only"])


def _powercut(image: Path, workdir: Path, name: str, **settings: Any) -> DiskBackend:
    options = ServeOptions(
        image=image,
        socket=workdir / f"{name}.sock",
        cache=settings["cache"],
        queues=settings["num_queues"],
        read_only=settings["read_only"],
    )
    return ProcessBackend.logging_in(options, workdir, name, settings["reconnect"])


def _qsd(image: Path, workdir: Path, name: str, **settings: Any) -> DiskBackend:
    options = QsdOptions.on_image(
        image,
        workdir / f"{name}.sock",
        settings["cache"],
        read_only=settings["read_only"],
        queues=settings["num_queues"],
        node_name=name,
    )
    return ProcessBackend.logging_in(options, workdir, name, settings["reconnect"])


# How `powercut vm` and `powercut bench` serve an image file with each backend.
_BACKENDS: dict[Backend, Callable[..., DiskBackend]] = {
    Backend.QEMU: _qemu,
    Backend.QSD: _qsd,
    Backend.POWERCUT: _powercut,
}


def make_backend(
    kind: Backend | str,
    image: Path,
    workdir: Path,
    *,
    cache: CacheMode = CacheMode.WRITEBACK,
    read_only: bool = False,
    num_queues: int = 1,
    reconnect: int = 1,
    name: str = "disk0",
) -> DiskBackend:
    """The image file `image` served by `kind`; a process's socket and log go in `workdir`."""
    return _BACKENDS[Backend.parse(kind)](
        Path(image),
        Path(workdir),
        name,
        cache=cache,
        read_only=read_only,
        num_queues=num_queues,
        reconnect=reconnect,
    )
