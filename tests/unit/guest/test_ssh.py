"""SSH readiness: the banner wait against real sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

import pytest

from harness.errors import MachineError, TimeoutExpired
from harness.guest.ssh import CommandResult, wait_for_banner


def _server(reply: bytes) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                if reply:
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_banner_wait_returns_once_an_ssh_server_speaks():
    srv, port = _server(b"SSH-2.0-dropbear\r\n")
    with srv:
        assert wait_for_banner("127.0.0.1", port, timeout=5) < 5


def test_an_accepted_but_silent_connection_is_not_ready():
    # QEMU's user-mode network accepts and closes before the guest listens.
    srv, port = _server(b"")
    with srv, pytest.raises(TimeoutExpired, match="no SSH banner"):
        wait_for_banner("127.0.0.1", port, timeout=1.5)


def test_banner_wait_stops_at_once_when_the_machine_died():
    srv, port = _server(b"")
    with srv, pytest.raises(MachineError, match="died"):
        wait_for_banner("127.0.0.1", port, timeout=30, alive=lambda: False)


def test_command_result_check_raises_with_command_and_stderr():
    from harness.errors import CommandError

    ok = CommandResult("true", 0, "", "")
    assert ok.check() is ok and ok.ok
    with pytest.raises(CommandError, match="exited 2") as info:
        CommandResult("mount /dev/vda /mnt", 2, "", "mount: bad superblock\n").check()
    assert info.value.command == "mount /dev/vda /mnt" and "bad superblock" in str(info.value)
