"""Fixtures: a real NBD server on a real node graph, in-process or as a daemon process."""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.block import BlockBackend, open_backend
from harness.nbd import NbdExport, NbdServer
from harness.nbd.export import MultiConn
from harness.proc import ManagedProcess
from harness.sockets import listen_unix

IMAGE_SIZE = 8 << 20
DAEMON = [sys.executable, "-m", "harness.storage_daemon"]
CLI = [sys.executable, "-m", "harness.cli"]


def canary(size: int = IMAGE_SIZE, seed: int = 20261122) -> bytes:
    """Random bytes every image starts with: anything written shows, anywhere."""
    return random.Random(seed).randbytes(size)


def uri(socket: Path, export: str = "disk") -> str:
    return f"nbd+unix:///{export}?socket={socket}"


def run_tool(argv: list[str], timeout: float = 60, check: bool = True) -> str:
    """A short-lived client (qemu-io, qemu-img, nbdinfo): its stdout; fails with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (ci/bootstrap installs it)")


@dataclass
class Served:
    image: Path
    socket: Path
    backend: BlockBackend
    server: NbdServer
    export: NbdExport
    workdir: Path

    @property
    def uri(self) -> str:
        return uri(self.socket, self.export.name)

    def image_bytes(self) -> bytes:
        return self.image.read_bytes()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """serve(graph=None, writable=True, cache=..., name=..., parallel=None) -> Served.

    `graph` is a `--blockdev` string with {image} and {dir} placeholders; by default a
    raw node over the image. The image starts as `canary()`.
    """
    started: list[Served] = []

    def _serve(
        graph: str | None = None,
        *,
        writable: bool = True,
        cache: str = "writeback",
        name: str = "disk",
        parallel: bool | None = None,
        multi_conn: MultiConn = MultiConn.AUTO,
    ) -> Served:
        n = len(started)
        workdir = tmp_path / f"nbd{n}"
        workdir.mkdir()
        image = workdir / "disk.img"
        image.write_bytes(canary())
        spec = (graph or "driver=raw,file.driver=file,file.filename={image}").format(
            image=image, dir=workdir
        )
        if "werror=" not in spec:
            spec += ",werror=report"  # as the daemon opens an NBD export's graph
        backend = open_backend(spec, cache=cache, read_only=not writable)
        sock = workdir / "nbd.sock"
        try:
            export = NbdExport(name, backend, writable=writable, multi_conn=multi_conn)
            server = NbdServer(
                listen_unix(sock), [export], path=sock, parallel_io=parallel, handshake_timeout=5
            ).start()
        except BaseException:
            backend.close()
            raise
        served = Served(image, sock, backend, server, export, workdir)
        started.append(served)
        return served

    yield _serve
    for served in started:
        served.server.close()
        served.backend.close()


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


@pytest.fixture
def procs() -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for p in started:
        p.stop()


def start_process(
    procs: list[ManagedProcess], argv: list[str], log: Path, wait_for: Path, **kwargs: object
) -> ManagedProcess:
    p = ManagedProcess(argv, name=Path(argv[0]).name, log_path=log, **kwargs)  # type: ignore[arg-type]
    procs.append(p)
    p.start()
    p.wait_for(wait_for.exists, 30, f"socket {wait_for}")
    return p


@pytest.fixture(autouse=True)
def _nbd_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="harness.nbd")
