"""An NBD export of a node graph in its own process, owned like every other child.

For code that puts QEMU's own block layer on top of the powercut stack (QEMU
as the system under test: its raw/qcow2 driver and cache mode over an NBD
connection to log-writes + powerfail):

    with NbdExportProcess(
        "driver=log-writes,log=W,file.driver=powerfail,file.journal=J,"
        "file.file.driver=raw,file.file.file.driver=file,file.file.file.filename=IMG",
        workdir,
    ) as nbd:
        qemu_args = ["-blockdev", nbd.qemu_blockdev("proto"),
                     "-blockdev", "driver=qcow2,file=proto,node-name=disk0,cache.direct=off"]
        ...
        nbd.freeze()   # a host power cut: the export stops mid-request (SIGSTOP)
        nbd.kill()

It runs `powercut serve --blockdev SPEC --nbd SOCKET` (so the control socket,
SOCKET.ctl, answers stats, write-cache, blkdebug and log-mark commands), with
werror=report as QEMU's export BlockBackends have: QEMU, the client, applies
its own error policy. The process lives in a ManagedProcess: its own process
group, killed with the harness, its log kept.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import TracebackType

from harness.errors import ConfigError
from harness.proc import ManagedProcess


class NbdExportProcess:
    """`powercut serve --nbd` for one graph; `uri`, `socket` and `qemu_blockdev()` for clients."""

    def __init__(
        self,
        blockdev: str,
        workdir: Path | str,
        *,
        export: str = "disk",
        cache: str = "writeback",
        read_only: bool = False,
        name: str = "nbd",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """`blockdev`: one nested `--blockdev` description (dotted or JSON), as
        `powercut serve --blockdev` takes it. `cache` sets the served graph's cache
        defaults (the client's own cache mode is the client's business)."""
        self.blockdev = blockdev
        self.workdir = Path(workdir)
        self.export = export
        self.cache = cache
        self.read_only = read_only
        self.name = name
        self.extra_args = extra_args
        self.socket = self.workdir / f"{name}.sock"
        self.control_socket = Path(f"{self.socket}.ctl")
        self.log_path = self.workdir / f"{name}-powercut-serve.log"
        self.proc: ManagedProcess | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def qemu_blockdev(self, node_name: str = "nbd0") -> str:
        """QEMU's `-blockdev` for the protocol node on this export."""
        return (
            f"driver=nbd,node-name={node_name},server.type=unix,"
            f"server.path={self.socket},export={self.export}"
        )

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "harness.cli",
            "serve",
            "--blockdev",
            self.blockdev,
            "--nbd",
            str(self.socket),
            "--nbd-export",
            self.export,
            "--cache",
            self.cache,
            *self.extra_args,
        ]
        if self.read_only:
            argv.append("--read-only")
        return argv

    def start(self, timeout: float = 30.0) -> NbdExportProcess:
        if self.proc is not None and self.proc.running:
            raise ConfigError(f"the NBD export {self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.proc = ManagedProcess(
            self.argv(),
            name=f"powercut-serve-{self.name}",
            log_path=self.log_path,
            stop_signal=signal.SIGTERM,
            stop_timeout=10.0,
        )
        self.proc.start()
        self.proc.wait_for(self._ready, timeout, f"NBD export socket {self.socket}")
        return self

    def _ready(self) -> bool:
        # The control socket is made after the export's: both exist once it serves.
        return self.socket.exists() and self.control_socket.exists()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def freeze(self) -> None:
        """SIGSTOP: requests in the export stop where they are (a host power cut)."""
        if self.proc is not None and self.proc.running:
            self.proc.signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL and reap (after freeze(), the cut is complete)."""
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        """SIGTERM (the graph is flushed and closed, as QEMU's bdrv_close), then reap."""
        if self.proc is not None:
            self.proc.stop()
        self.socket.unlink(missing_ok=True)
        self.control_socket.unlink(missing_ok=True)

    def __enter__(self) -> NbdExportProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
