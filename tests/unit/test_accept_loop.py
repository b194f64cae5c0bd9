"""The one accept loop (harness.sockets.AcceptLoop) and the three servers that use it.

Out of file descriptors, accept(2) fails at once for as long as the client
waits in the backlog: a loop that retried at once would spin a core. Each
test below that looks at the back-off measures the gaps between accept
calls, so a loop that does not wait fails it.
"""

from __future__ import annotations

import errno
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import control as control_mod
from harness.block import open_backend
from harness.control import ControlServer
from harness.nbd import NbdServer
from harness.sockets import AcceptLoop, listen_unix
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.server import VhostUserBlkServer


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout}s: {what}")
        time.sleep(0.005)


class ScarceListener:
    """A listener whose accept(2) follows a script — an errno fails that call, a socket is
    handed over — and then blocks until shut down, as a real one does."""

    def __init__(self, *script: int | socket.socket) -> None:
        self.script = list(script)
        self.calls: list[float] = []
        self.shut = threading.Event()
        self.closed = False

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls.append(time.monotonic())
        if self.script and not self.shut.is_set():
            step = self.script.pop(0)
            if isinstance(step, int):
                raise OSError(step, errno.errorcode[step])
            return step, None
        self.shut.wait()
        raise OSError(errno.EINVAL, "Invalid argument")

    def shutdown(self, how: int) -> None:
        self.shut.set()

    def close(self) -> None:
        self.closed = True
        self.shut.set()

    def fileno(self) -> int:
        return -1 if self.closed else 99

    def listen(self, backlog: int) -> None:
        pass

    def getsockname(self) -> str:
        return "/fake.sock"


def gaps(calls: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(calls)]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_each_connection_is_handed_over_and_stop_ends_the_loop(tmp_path: Path) -> None:
    listener = listen_unix(tmp_path / "s.sock")
    handed: list[socket.socket] = []
    loop = AcceptLoop(listener, handed.append, name="test").start()
    clients = []
    try:
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(tmp_path / "s.sock"))
            clients.append(c)
        wait_until("three connections handed over", lambda: len(handed) == 3)
    finally:
        loop.stop()
        loop.join(5)
        listener.close()
        for s in clients + handed:
            s.close()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop.failures == 0


@pytest.mark.parametrize(
    "error", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS], ids=["EMFILE", "ENFILE", "ENOBUFS"]
)
def test_out_of_descriptors_the_loop_waits_doubling_then_serves(
    error: int, pair: tuple[socket.socket, socket.socket]
) -> None:
    listener = ScarceListener(error, error, error, error, pair[0])
    handed: list[socket.socket] = []
    loop = AcceptLoop(listener, handed.append, name="t", backoff=0.04, max_backoff=0.1)  # type: ignore[arg-type]
    loop.start()
    try:
        wait_until("the connection after the failures", lambda: handed == [pair[0]])
    finally:
        loop.stop()
        loop.join(5)
    assert loop.failures == 4
    waited = gaps(listener.calls)[:4]
    for got, least in zip(waited, [0.04, 0.08, 0.1, 0.1], strict=True):
        assert got >= least * 0.95, f"accept retried after {got:.3f}s, not {least}s: {waited}"


def test_a_connection_resets_the_pause(pair: tuple[socket.socket, socket.socket]) -> None:
    emfile = errno.EMFILE
    listener = ScarceListener(emfile, emfile, emfile, pair[0], emfile)
    loop = AcceptLoop(listener, lambda c: None, name="t", backoff=0.05, max_backoff=10.0)  # type: ignore[arg-type]
    loop.start()
    try:
        wait_until("the accept after the last failure", lambda: len(listener.calls) == 6)
    finally:
        loop.stop()
        loop.join(5)
    waited = gaps(listener.calls)
    assert waited[2] >= 0.19  # 0.05, 0.1, 0.2: doubling before the connection
    # After it, a failure waits the first pause again, not the 0.4 s doubling had reached.
    assert 0.045 <= waited[4] < 0.3, waited
    assert loop.failures == 4


def test_stop_ends_a_long_pause_at_once() -> None:
    listener = ScarceListener(*[errno.EMFILE] * 1000)
    loop = AcceptLoop(listener, lambda c: None, name="t", backoff=30.0, max_backoff=30.0)  # type: ignore[arg-type]
    loop.start()
    wait_until("the first failure", lambda: loop.failures == 1)
    t0 = time.monotonic()
    loop.stop()
    loop.join(5)
    assert loop._thread is not None and not loop._thread.is_alive()
    assert time.monotonic() - t0 < 2.0
    assert len(listener.calls) == 1


def test_a_failing_handler_closes_its_connection_and_the_loop_goes_on(tmp_path: Path) -> None:
    listener = listen_unix(tmp_path / "s.sock")
    seen: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        seen.append(conn)
        if len(seen) == 1:
            raise RuntimeError("a bug met by one client")

    loop = AcceptLoop(listener, handle, name="t").start()
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        first.connect(str(tmp_path / "s.sock"))
        wait_until("the first connection", lambda: len(seen) == 1)
        first.settimeout(5)
        assert first.recv(1) == b""  # closed by the loop
        second.connect(str(tmp_path / "s.sock"))
        wait_until("the second connection", lambda: len(seen) == 2)
    finally:
        loop.stop()
        loop.join(5)
        listener.close()
        for s in (first, second, *seen):
            s.close()


def _nbd(listener: ScarceListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return NbdServer(listener, [], name="nbd").start()  # type: ignore[arg-type]


def _vhost(listener: ScarceListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    backend = open_backend("driver=null")
    device = VirtioBlkDevice(backend, BlkConfig())
    return VhostUserBlkServer(device, listener).start()  # type: ignore[arg-type]


def _control(listener: ScarceListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(control_mod, "listen_unix", lambda path: listener)
    return ControlServer(tmp_path / "ctl.sock").start()


@pytest.mark.parametrize("make", [_nbd, _vhost, _control], ids=["nbd", "vhost-user", "control"])
def test_every_server_backs_off_when_out_of_descriptors(
    make: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = ScarceListener(errno.EMFILE, errno.ENFILE, errno.EMFILE)
    server = make(listener, tmp_path, monkeypatch)
    try:
        wait_until("three failures and a fourth try", lambda: len(listener.calls) >= 4)
    finally:
        server.close()
    assert listener.shut.is_set() and listener.closed
    waited = gaps(listener.calls)[:3]
    assert all(g >= 0.045 for g in waited), f"accept retried without a pause: {waited}"
    assert len(listener.calls) == 4  # and it stopped when closed


def test_a_socket_path_appears_only_once_it_listens(tmp_path: Path) -> None:
    # A client that waits for the path to exist and connects at once is never refused (the
    # path used to appear at bind(), before listen()); no temporary name is left behind.
    path = tmp_path / "s.sock"
    refused: list[int] = []
    go, done = threading.Event(), threading.Event()

    def client() -> None:
        for _ in range(50):
            assert go.wait(30)
            go.clear()
            while not path.exists():  # spinning from before the server binds
                pass
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                try:
                    c.connect(str(path))
                except ConnectionRefusedError:
                    refused.append(1)
            done.set()

    t = threading.Thread(target=client)
    t.start()
    for _ in range(50):
        go.set()
        listener = listen_unix(path)
        assert done.wait(30)
        done.clear()
        path.unlink()
        listener.close()
    t.join(30)
    assert not refused
    assert list(tmp_path.iterdir()) == []
