"""The Machine interface that QEMU-direct and libvirt machines share."""

from __future__ import annotations

import abc
import contextlib
import logging
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

from harness.errors import MachineError, PowercutError
from harness.guest.ssh import CommandResult, SSHSession
from harness.vm.accel import choose_accel
from harness.vm.spec import Accel, MachineSpec

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ConsoleLog:
    """The guest's serial console, as a file that outlives the machine."""

    path: Path

    @property
    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-lines:])


def free_port() -> int:
    """A 127.0.0.1 TCP port free right now; callers retry if someone takes it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Machine(abc.ABC):
    """A guest that can be booted, reached, power-cut and booted again.

    A Machine is a context manager that never leaks: leaving the block kills
    the hypervisor process and, unless `keep` is set, removes its work dir.
    """

    def __init__(
        self,
        spec: MachineSpec,
        *,
        workdir: Path | None = None,
        accel: Accel | None = None,
        keep: bool = False,
    ) -> None:
        self.spec = spec
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"powercut-{spec.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.requested_accel = accel  # None: resolved on first use (`choose_accel`)
        self._accel: Accel | None = accel
        self.keep = keep
        self.console_log = ConsoleLog(self.workdir / "console.log")
        self.ports: dict[int, int] = {}  # guest port → host port
        self.boots = 0
        self.boot_seconds: float | None = None  # start() to SSH ready, last boot
        self._ssh: SSHSession | None = None
        self._started_at = 0.0

    # -- to implement --------------------------------------------------------

    @abc.abstractmethod
    def _launch(self) -> None:
        """Start the hypervisor side; fill self.ports."""

    @abc.abstractmethod
    def _kill(self) -> None:
        """Stop the guest abruptly (no flush, no shutdown)."""

    @abc.abstractmethod
    def _wait_stopped(self, timeout: float) -> bool:
        """True once the guest has stopped by itself within `timeout`."""

    @property
    @abc.abstractmethod
    def running(self) -> bool: ...

    @property
    def accel(self) -> Accel:
        """The accelerator asked for; else the one `choose_accel` gives (a run asks for one)."""
        if self._accel is None:
            self._accel = self._resolve_accel()
        return self._accel

    def _resolve_accel(self) -> Accel:
        return choose_accel(None, self.spec.kernel)

    @property
    @abc.abstractmethod
    def qmp(self) -> Any:
        """A QMP connection (qemu.qmp legacy QEMUMonitorProtocol or libvirt's monitor bridge)."""

    def logs(self) -> dict[str, Path]:
        """Log files worth attaching to a failed test report."""
        return {"console": self.console_log.path}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Machine:
        if self.running:
            raise MachineError(f"machine {self.spec.name} is already running")
        self._close_ssh()
        self.boots += 1
        with open(self.console_log.path, "a") as f:
            f.write(f"\n----- powercut: boot {self.boots} -----\n")
        self._started_at = time.monotonic()
        self._launch()
        return self

    def wait_ready(self, timeout: float = 120.0) -> SSHSession:
        """Wait until SSH works; the session is then `self.ssh`."""
        if self._ssh is not None and self._ssh.active:
            return self._ssh
        port = self.host_port(self.spec.ssh_port)
        try:
            self._ssh = SSHSession.connect(
                HOST,
                port,
                self.spec.ssh_key,
                self.spec.host_public_key,
                timeout=timeout,
                alive=lambda: self.running,
            )
        except MachineError as exc:
            raise MachineError(f"{exc}; console:\n{self.console_log.tail()}") from exc
        self.boot_seconds = time.monotonic() - self._started_at
        log.info(
            "%s ready for SSH after %.2fs (%s)", self.spec.name, self.boot_seconds, self.accel.value
        )
        return self._ssh

    def boot(self, timeout: float = 120.0) -> SSHSession:
        self.start()
        return self.wait_ready(timeout)

    @property
    def ssh(self) -> SSHSession:
        if self._ssh is None or not self._ssh.active:
            raise MachineError(f"machine {self.spec.name} is not ready: call wait_ready() first")
        return self._ssh

    def run(self, command: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        return self.ssh.run(command, timeout, check=check)

    def host_port(self, guest_port: int) -> int:
        try:
            return self.ports[guest_port]
        except KeyError:
            raise MachineError(
                f"guest port {guest_port} is not forwarded; add it to MachineSpec.forwards"
            ) from None

    def power_cut(self) -> None:
        """Kill the hypervisor: the guest loses everything it had not written out."""
        self._close_ssh()
        self._kill()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Sync and power off from inside the guest; kill if it does not stop in time."""
        if not self.running:
            self._close_ssh()
            self._kill()
            return
        if self._ssh is None or not self._ssh.active:
            # Nobody to ask inside (the guest's init has no ACPI button handler).
            log.info("%s: no SSH session to power off through; stopping it", self.spec.name)
            self._close_ssh()
            self._kill()
            return
        # The link drops while the guest powers off, so poweroff is not waited for.
        with contextlib.suppress(PowercutError, OSError, EOFError, paramiko.SSHException):
            self._ssh.run("sync", timeout=timeout)
            self._ssh.start("poweroff -f")
        self._close_ssh()
        if not self._wait_stopped(timeout):
            log.warning("%s did not power off within %.0fs; killing it", self.spec.name, timeout)
        self._kill()

    def close(self) -> None:
        """Kill whatever still runs and remove the work dir (unless kept)."""
        self._close_ssh()
        self._kill()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_ssh(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
