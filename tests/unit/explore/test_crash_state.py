"""The `crash-state` node: a state as a disk, writes thrown away, switched at run time.

Driven through the real vhost-user-blk server with the in-process frontend,
and switched through the control socket's `state-switch` command, as the
checker guest's loop will do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.block import open_backend
from harness.control import ControlServer, control_request
from harness.durability.delta import write_delta
from harness.errors import ConfigError, JournalError
from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.blk import BlkConfig, VirtioBlkDevice
from harness.vhost.fault_commands import register_fault_commands
from harness.vhost.server import VhostUserBlkServer

SIZE = 1 << 20
SECTOR = 512


def _sector(tag: int) -> bytes:
    return bytes([tag]) * SECTOR


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[VhostUserFrontend, Path, Path]]:
    base = tmp_path / "base.img"
    base.write_bytes(bytes([0xBB]) * SIZE)
    a, b = tmp_path / "a.delta", tmp_path / "b.delta"
    write_delta(a, SECTOR, SIZE, [(4, _sector(0xA1)), (5, _sector(0xA2)), (100, _sector(0xA3))])
    write_delta(b, SECTOR, SIZE, [(5, _sector(0xB2)), (200, _sector(0xB3))])
    backend = open_backend(
        f"driver=crash-state,node-name=cs,delta={a},file.driver=file,file.filename={base}",
        cache="writeback",
    )
    device = VirtioBlkDevice(backend, BlkConfig(num_queues=1))
    sock = tmp_path / "vhost.sock"
    server = VhostUserBlkServer.on_path(device, sock, num_queues=1).start()
    control = ControlServer(tmp_path / "ctl.sock")
    register_fault_commands(control, backend)
    control.start()
    fe = VhostUserFrontend(sock)
    try:
        fe.negotiate(num_queues=1)
        yield fe, a, b
    finally:
        fe.close()
        control.close()
        server.close()
        backend.close()


def _read(fe: VhostUserFrontend, sector: int, n: int = 1) -> bytes:
    c = fe.read(sector, n * SECTOR)
    assert fe.status_ok(c)
    return c.data


def test_switching_states_discards_writes_and_shows_the_new_state(
    disk: tuple[VhostUserFrontend, Path, Path], tmp_path: Path
) -> None:
    fe, _a, b = disk
    assert _read(fe, 3, 4) == _sector(0xBB) + _sector(0xA1) + _sector(0xA2) + _sector(0xBB)
    assert _read(fe, 100) == _sector(0xA3)
    # The guest mounts state A and writes: over the delta, over the base, partly.
    assert fe.status_ok(fe.write(5, _sector(0x11)))
    assert fe.status_ok(fe.write(300, _sector(0x22) * 2))
    assert fe.status_ok(fe.write_zeroes(100, 1))
    assert fe.status_ok(fe.flush())
    assert _read(fe, 4, 2) == _sector(0xA1) + _sector(0x11)
    assert _read(fe, 300, 2) == _sector(0x22) * 2
    assert _read(fe, 100) == bytes(SECTOR)

    answer = control_request(tmp_path / "ctl.sock", {"cmd": "state-switch", "delta": str(b)})
    assert answer["discarded_sectors"] == 4 and answer["sectors"] == 2

    # Exactly state B: none of A's delta, none of what was written under A.
    for sector, want in [(4, 0xBB), (5, 0xB2), (100, 0xBB), (200, 0xB3), (300, 0xBB), (301, 0xBB)]:
        assert _read(fe, sector) == _sector(want), sector
    # The base was never written.
    assert (tmp_path / "base.img").read_bytes() == bytes([0xBB]) * SIZE
    # Back to the plain base.
    control_request(tmp_path / "ctl.sock", {"cmd": "state-switch", "delta": None})
    assert _read(fe, 5) == _sector(0xBB)


def test_a_bad_delta_is_refused_and_the_state_stays(
    disk: tuple[VhostUserFrontend, Path, Path], tmp_path: Path
) -> None:
    fe, _a, _b = disk
    wrong = tmp_path / "wrong.delta"
    write_delta(wrong, SECTOR, 2 * SIZE, [(1, _sector(1))])
    with pytest.raises(Exception, match="image of 2097152 bytes"):
        control_request(tmp_path / "ctl.sock", {"cmd": "state-switch", "delta": str(wrong)})
    with pytest.raises(Exception, match="does not exist"):
        control_request(tmp_path / "ctl.sock", {"cmd": "state-switch", "delta": "/nonexistent"})
    assert _read(fe, 5) == _sector(0xA2)


def test_a_sub_sector_write_keeps_the_rest_of_the_sector(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes([0xBB]) * SIZE)
    d = tmp_path / "d.delta"
    write_delta(d, SECTOR, SIZE, [(1, _sector(0xA1))])
    with open_backend(
        f"driver=crash-state,delta={d},file.driver=file,file.filename={base}", cache="writeback"
    ) as be:
        be.write(SECTOR + 100, b"xyz")
        got = be.read(SECTOR, SECTOR)
        assert got == _sector(0xA1)[:100] + b"xyz" + _sector(0xA1)[103:]
        be.discard(0, SECTOR)
        assert be.read(0, SECTOR) == bytes(SECTOR)


def test_options_are_checked(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    with pytest.raises(JournalError, match="does not exist"):
        open_backend(
            f"driver=crash-state,delta={tmp_path}/no,file.driver=file,file.filename={base}"
        )
    with pytest.raises(ConfigError, match="file"):
        open_backend("driver=crash-state")
