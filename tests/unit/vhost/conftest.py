"""Fixtures: a real BlockBackend on a temp image, served in-process, and a test frontend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.block import BlockBackend, open_backend
from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.server import VhostUserBlkServer

IMAGE_SIZE = 8 << 20


@dataclass
class Served:
    image: Path
    socket: Path
    backend: BlockBackend
    device: VirtioBlkDevice
    server: VhostUserBlkServer

    def frontend(self, **negotiate: object) -> VhostUserFrontend:
        fe = VhostUserFrontend(self.socket)
        try:
            fe.negotiate(**negotiate)  # type: ignore[arg-type]
        except BaseException:
            fe.close()
            raise
        return fe


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """serve(cache=..., read_only=..., num_queues=..., serial=..., block_size=...) -> Served."""
    started: list[Served] = []

    def _serve(
        *,
        cache: str = "writeback",
        read_only: bool = False,
        num_queues: int = 2,
        serial: str = "powercut-test",
        block_size: int = 512,
        options: str | None = None,
    ) -> Served:
        image = tmp_path / f"disk{len(started)}.img"
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(IMAGE_SIZE)
        backend = open_backend(options or str(image), cache=cache, read_only=read_only)
        device = VirtioBlkDevice(
            backend,
            BlkConfig(
                num_queues=num_queues,
                serial=serial,
                logical_block_size=block_size,
                read_only=read_only,
            ),
        )
        sock = tmp_path / f"s{len(started)}" / "vhost.sock"
        server = VhostUserBlkServer.on_path(device, sock, num_queues=num_queues).start()
        served = Served(image, sock, backend, device, server)
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
def fe(served: Served) -> Iterator[VhostUserFrontend]:
    frontend = served.frontend(num_queues=2)
    yield frontend
    frontend.close()


@pytest.fixture(autouse=True)
def _quiet_vhost_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="harness.vhost")
