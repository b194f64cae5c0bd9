"""Where a guest's disk is served from: a small pluggable layer.

`builtin` is QEMU's own virtio-blk with a cache mode; `qemu-storage-daemon`
is QEMU's reference vhost-user-blk export; `powercut` is this project's block
stack served by `powercut serve`. Each backend turns an image file into the
`Disk` a MachineSpec attaches, and owns whatever process serves it.
"""

from __future__ import annotations

import abc
import enum
import logging
import signal
import sys
from pathlib import Path
from types import TracebackType

from harness.block.cache import CacheMode, cache_settings, parse_cache_mode
from harness.block.options import format_dotted
from harness.errors import ConfigError
from harness.proc import ManagedProcess
from harness.vm.spec import Disk, FileDisk, VhostUserDisk

log = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"


class BackendKind(enum.Enum):
    POWERCUT = "powercut"
    QSD = "qemu-storage-daemon"
    BUILTIN = "builtin"


class DiskBackend(abc.ABC):
    """Serves one image file as one guest disk."""

    kind: BackendKind

    def __init__(
        self,
        image: Path,
        workdir: Path,
        *,
        cache: CacheMode | str = "writeback",
        read_only: bool = False,
        num_queues: int = 1,
        reconnect: int = 1,
        name: str = "disk0",
    ) -> None:
        self.image = Path(image)
        self.workdir = Path(workdir)
        self.cache = parse_cache_mode(cache)
        self.read_only = read_only
        self.num_queues = num_queues
        self.reconnect = reconnect
        self.name = name

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


class BuiltinBackend(DiskBackend):
    kind = BackendKind.BUILTIN

    def start(self) -> Disk:
        return FileDisk(self.image, self.cache, self.read_only)

    def stop(self) -> None:
        """Nothing to stop: QEMU itself serves the disk."""


class _ProcessBackend(DiskBackend):
    """A vhost-user backend in a child process listening on a unix socket."""

    process_name = "backend"

    def __init__(self, image: Path, workdir: Path, **kwargs: object) -> None:
        super().__init__(image, workdir, **kwargs)  # type: ignore[arg-type]
        self.socket = self.workdir / f"{self.name}.sock"
        self.log_path = self.workdir / f"{self.name}-{self.process_name}.log"
        self.proc: ManagedProcess | None = None

    @abc.abstractmethod
    def argv(self) -> list[str]: ...

    def start(self) -> Disk:
        if self.proc is not None and self.proc.running:
            raise ConfigError(f"{self.process_name} for {self.image} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.proc = ManagedProcess(
            self.argv(),
            name=f"{self.process_name}-{self.name}",
            log_path=self.log_path,
            stop_signal=signal.SIGTERM,
            stop_timeout=10.0,
        )
        self.proc.start()
        self.proc.wait_for(self.socket.exists, 30, f"{self.process_name} socket {self.socket}")
        return VhostUserDisk(self.socket, reconnect=self.reconnect, num_queues=self.num_queues)

    def kill(self) -> None:
        """SIGKILL the backend (a backend crash); QEMU reconnects when it is started again."""
        if self.proc is not None:
            self.proc.kill()

    def freeze(self) -> None:
        """SIGSTOP the backend where it stands: a host power cut stops it mid-request."""
        if self.proc is not None and self.proc.running:
            self.proc.signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.socket.unlink(missing_ok=True)

    def logs(self) -> dict[str, Path]:
        return {f"{self.name} {self.process_name}": self.log_path}


class QsdBackend(_ProcessBackend):
    """qemu-storage-daemon's vhost-user-blk export: the reference backend."""

    kind = BackendKind.QSD
    process_name = QSD

    def argv(self) -> list[str]:
        s = cache_settings(self.cache)
        file_node = {
            "driver": "file",
            "filename": str(self.image),
            "node-name": "file0",
            "read-only": self.read_only,
            "cache": {"direct": s.direct, "no-flush": s.no_flush},
        }
        export = {
            "type": "vhost-user-blk",
            "id": "export0",
            "node-name": self.name,
            "addr": {"type": "unix", "path": str(self.socket)},
            "writable": not self.read_only,
            "writethrough": not s.write_cache,
            "num-queues": self.num_queues,
        }
        raw = {
            "driver": "raw",
            "file": "file0",
            "node-name": self.name,
            "read-only": self.read_only,
        }
        return [
            QSD,
            "--blockdev",
            format_dotted(file_node),
            "--blockdev",
            format_dotted(raw),
            "--export",
            format_dotted(export),
        ]


class PowercutBackend(_ProcessBackend):
    """This project's block stack, served by `powercut serve`."""

    kind = BackendKind.POWERCUT
    process_name = "powercut-serve"

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "harness.cli",
            "serve",
            str(self.image),
            "--socket",
            str(self.socket),
            "--cache",
            self.cache.value,
            "--queues",
            str(self.num_queues),
        ]
        if self.read_only:
            argv.append("--read-only")
        return argv


_BACKENDS: dict[BackendKind, type[DiskBackend]] = {
    BackendKind.BUILTIN: BuiltinBackend,
    BackendKind.QSD: QsdBackend,
    BackendKind.POWERCUT: PowercutBackend,
}


def make_backend(
    kind: BackendKind | str, image: Path, workdir: Path, **kwargs: object
) -> DiskBackend:
    try:
        k = BackendKind(kind)
    except ValueError:
        names = ", ".join(b.value for b in BackendKind)
        raise ConfigError(f"unknown disk backend {kind!r}; choose one of {names}") from None
    return _BACKENDS[k](image, workdir, **kwargs)  # type: ignore[arg-type]
