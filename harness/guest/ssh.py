"""SSH into a guest with paramiko: commands, streamed output, file copies.

The guest runs dropbear; its host key is generated when the image is built,
so we verify it (RejectPolicy) instead of trusting the first key we see.
"""

from __future__ import annotations

import base64
import logging
import select
import selectors
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

from harness.errors import CommandError, MachineError, TimeoutExpired

log = logging.getLogger(__name__)

LineCallback = Callable[[str], None]


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> CommandResult:
        """Self, or CommandError when the command failed."""
        if self.exit_code != 0:
            raise CommandError(self.command, self.exit_code, self.stdout, self.stderr)
        return self


# Banner probes: a new connection every _PROBE_EVERY seconds, each kept up to
# _PROBE_LIFE seconds, at most _PROBES at once.
_PROBE_EVERY = 0.2
_PROBE_LIFE = 1.5
_PROBES = 4


def wait_for_banner(
    host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None
) -> float:
    """Wait until an SSH server answers on host:port; returns the seconds waited.

    QEMU's user-mode network accepts the TCP connection itself before the
    guest listens, so a successful connect() proves nothing: only the
    server's `SSH-` banner does. A connection made before the guest's network
    is up stalls in QEMU's SYN retries, so probes overlap: a new one starts
    every 0.2 s while older ones wait, and the first banner wins.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}  # probe → when to give up on it
    next_probe = t0

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        pending.pop(sock, None)
        sock.close()

    try:
        while True:
            now = time.monotonic()
            if alive is not None and not alive():
                raise MachineError(f"the machine died before SSH answered on {host}:{port}")
            if now > deadline:
                raise TimeoutExpired(
                    f"no SSH banner on {host}:{port} after {timeout:.0f}s; "
                    "see the machine's console log"
                )
            if now >= next_probe and len(pending) < _PROBES:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex((host, port))
                sel.register(sock, selectors.EVENT_READ)
                pending[sock] = now + _PROBE_LIFE
                next_probe = now + _PROBE_EVERY
            for key, _ in sel.select(timeout=0.05):
                probe: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = probe.recv(4)
                except OSError:
                    data = b""
                if data == b"SSH-":
                    return time.monotonic() - t0
                drop(probe)
            for probe, give_up in list(pending.items()):
                if time.monotonic() > give_up:
                    drop(probe)
    finally:
        for probe in list(pending):
            drop(probe)
        sel.close()


class SSHSession:
    """One authenticated SSH connection to a guest."""

    def __init__(self, client: paramiko.SSHClient, host: str, port: int) -> None:
        self._client = client
        self.host = host
        self.port = port

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        key_path: Path,
        host_public_key: str | None = None,
        *,
        user: str = "root",
        timeout: float = 120.0,
        alive: Callable[[], bool] | None = None,
    ) -> SSHSession:
        """Connect once the guest's SSH server is up, retrying until `timeout`."""
        deadline = time.monotonic() + timeout
        wait_for_banner(host, port, timeout, alive)
        pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            if host_public_key:
                kind, b64 = host_public_key.split()[:2]
                name = host if port == 22 else f"[{host}]:{port}"
                client.get_host_keys().add(
                    name, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
                )
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            left = max(1.0, deadline - time.monotonic())
            try:
                client.connect(
                    host,
                    port,
                    username=user,
                    pkey=pkey,
                    allow_agent=False,
                    look_for_keys=False,
                    timeout=min(30.0, left),
                    banner_timeout=min(30.0, left),
                    auth_timeout=min(30.0, left),
                )
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise MachineError(
                    f"the guest on {host}:{port} has an unexpected host key; "
                    "is another VM on that port?"
                ) from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                client.close()
                last = exc
                if alive is not None and not alive():
                    break
                time.sleep(0.2)
                continue
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(5)
            return cls(client, host, port)
        raise TimeoutExpired(f"SSH to root@{host}:{port} did not succeed in {timeout:.0f}s: {last}")

    # -- commands -------------------------------------------------------

    def _open(self, command: str, pty: bool = False) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise MachineError(f"the SSH connection to {self.host}:{self.port} is closed")
        chan = transport.open_session(timeout=30)
        if pty:
            chan.get_pty()
        chan.exec_command(command)
        return chan

    def run(
        self,
        command: str,
        timeout: float = 60.0,
        *,
        check: bool = False,
        input: bytes | None = None,
        on_stdout: LineCallback | None = None,
        on_stderr: LineCallback | None = None,
    ) -> CommandResult:
        """Run `command` with /bin/sh in the guest and wait for it.

        `on_stdout`/`on_stderr` get each complete line as it arrives (for
        workloads that report progress, such as acknowledged writes).
        """
        chan = self._open(command)
        out = bytearray()
        err = bytearray()
        pending = {1: bytearray(), 2: bytearray()}
        callbacks = {1: on_stdout, 2: on_stderr}

        def feed(fd: int, data: bytes) -> None:
            (out if fd == 1 else err).extend(data)
            cb = callbacks[fd]
            if cb is None:
                return
            buf = pending[fd]
            buf.extend(data)
            while (nl := buf.find(b"\n")) >= 0:
                cb(buf[:nl].decode(errors="replace"))
                del buf[: nl + 1]

        try:
            if input is not None:
                chan.sendall(input)
            chan.shutdown_write()
            deadline = time.monotonic() + timeout
            while True:
                got = False
                while chan.recv_ready():
                    feed(1, chan.recv(65536))
                    got = True
                while chan.recv_stderr_ready():
                    feed(2, chan.recv_stderr(65536))
                    got = True
                # Done once the exit status and EOF are in and nothing is left to read.
                if (
                    chan.exit_status_ready()
                    and (chan.eof_received or chan.closed)
                    and not chan.recv_ready()
                    and not chan.recv_stderr_ready()
                ):
                    # chan.closed without EOF: the connection died (the guest lost
                    # power); the channel's pipe then stays readable, so waiting on
                    # it would spin until the timeout.
                    break
                if got:
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutExpired(
                        f"guest command {command!r} still running after {timeout:.0f}s"
                    )
                select.select([chan], [], [], min(left, 0.5))
            code = chan.recv_exit_status()
        finally:
            chan.close()
        for fd, buf in pending.items():
            cb = callbacks[fd]
            if cb is not None and buf:
                cb(buf.decode(errors="replace"))
        result = CommandResult(
            command, code, out.decode(errors="replace"), err.decode(errors="replace")
        )
        log.debug("guest %r exited %d", command, code)
        return result.check() if check else result

    def start(self, command: str) -> None:
        """Start `command` and return at once (for poweroff, reboot, daemons)."""
        self._open(command).shutdown_write()

    def open_channel(self, command: str) -> paramiko.Channel:
        """Start `command` on a channel of its own and hand the channel over.

        For a long-lived helper that talks over its stdin and stdout
        (`harness.guest.checker`): one channel instead of one per command.
        """
        return self._open(command)

    def check_output(self, command: str, timeout: float = 60.0) -> str:
        """stdout of `command`; CommandError (command, exit code, stderr) if it fails."""
        return self.run(command, timeout, check=True).stdout

    def stream(self, command: str, timeout: float = 3600.0) -> Iterator[str]:
        """Yield stdout line by line as the guest prints it; CommandError at the end on failure."""
        chan = self._open(command)
        chan.shutdown_write()
        buf = bytearray()
        err = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(65536))
                    continue
                if chan.recv_ready():
                    data = chan.recv(65536)
                    buf.extend(data)
                    while (nl := buf.find(b"\n")) >= 0:
                        yield buf[:nl].decode(errors="replace")
                        del buf[: nl + 1]
                    continue
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutExpired(
                        f"guest command {command!r} still running after {timeout:.0f}s"
                    )
                select.select([chan], [], [], min(left, 0.5))
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
            if buf:
                yield buf.decode(errors="replace")
            code = chan.recv_exit_status()
        finally:
            chan.close()
        if code != 0:
            raise CommandError(command, code, "", err.decode(errors="replace"))

    # -- files ----------------------------------------------------------

    def put(self, local: Path | str, remote: str, mode: int | None = None) -> None:
        """Copy a host file into the guest (through `cat`, so no sftp server is needed)."""
        self.put_bytes(Path(local).read_bytes(), remote, mode)

    def put_bytes(self, data: bytes, remote: str, mode: int | None = None) -> None:
        q = shlex.quote(remote)
        cmd = f"cat > {q}" + (f" && chmod {mode:o} {q}" if mode is not None else "")
        self.run(cmd, timeout=120, check=True, input=data)

    def get(self, remote: str, local: Path | str) -> None:
        Path(local).write_bytes(self.get_bytes(remote))

    def get_bytes(self, remote: str) -> bytes:
        chan = self._open(f"cat {shlex.quote(remote)}")
        chan.shutdown_write()
        try:
            data = bytearray()
            while chunk := chan.recv(65536):
                data.extend(chunk)
            err = chan.makefile_stderr("rb").read().decode(errors="replace")
            code = chan.recv_exit_status()
        finally:
            chan.close()
        if code != 0:
            raise CommandError(f"cat {remote}", code, "", err)
        return bytes(data)

    # -- interactive ------------------------------------------------------

    def interactive_shell(self) -> int:
        """Attach the local terminal to a guest shell with a pty; returns its exit status."""
        from harness.guest.tty import attach

        transport = self._client.get_transport()
        if transport is None:
            raise MachineError("the SSH connection is closed")
        chan = transport.open_session()
        return attach(chan)

    @property
    def active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
