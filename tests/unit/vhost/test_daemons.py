"""`powercut serve` and `powercut-storage-daemon` as processes: serve, crash, restart, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.control import control_request
from harness.durability.writelog import read_log
from harness.errors import PowercutError
from harness.proc import ManagedProcess
from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.virtio import VirtioBlkFeature, VirtioBlkRequestType, VirtioBlkStatus

OK, IOERR = VirtioBlkStatus.OK, VirtioBlkStatus.IOERR
DAEMON = [
    sys.executable,
    "-c",
    "import sys; from harness.storage_daemon import main; sys.exit(main())",
]
SERVE = [sys.executable, "-m", "harness.cli"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for p in started:
        p.stop()


def start(
    procs: list[ManagedProcess], argv: list[str], log: Path, sock: Path, **kwargs: object
) -> ManagedProcess:
    p = ManagedProcess(argv, name=Path(argv[0]).name, log_path=log, **kwargs)  # type: ignore[arg-type]
    procs.append(p)
    p.start()
    p.wait_for(sock.exists, 30, f"socket {sock}")
    return p


def test_serve_answers_stats_and_exits_0_on_sigterm(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    sock = tmp_path / "run" / "vda.sock"
    p = start(
        procs,
        [
            *SERVE,
            "serve",
            str(image),
            "--socket",
            str(sock),
            "--queues",
            "2",
            "--serial",
            "S1",
            "--cache",
            "writethrough",
        ],
        tmp_path / "serve.log",
        sock,
    )
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    with VhostUserFrontend(sock) as fe:
        fe.negotiate(num_queues=2)
        assert fe.config_field("writeback") == 0
        assert fe.write(0, b"s" * 4096).status == OK
        assert fe.get_id().data.rstrip(b"\0") == b"S1"
        stats = control_request(f"{sock}.ctl", {"cmd": "stats"})
        assert stats["connected"] and stats["requests"]["OUT"] == 1
        assert stats["block"]["fua_writes"] == 1
        control_request(f"{sock}.ctl", {"cmd": "write-cache", "enabled": True})
        assert fe.get_config(32, 1) == b"\x01"
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert not sock.exists()
    with open(image, "rb") as f:
        assert f.read(4096) == b"s" * 4096


def test_serve_with_a_blockdev_and_throttling(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    sock = tmp_path / "t.sock"
    spec = f"driver=raw,file.driver=file,file.filename={image}"
    start(
        procs,
        [*SERVE, "serve", "--blockdev", spec, "--socket", str(sock), "--iops-total", "1000"],
        tmp_path / "serve.log",
        sock,
    )
    with VhostUserFrontend(sock) as fe:
        fe.negotiate()
        assert fe.write(8, b"t" * 512).status == OK


def test_backend_killed_mid_request_resubmits_after_restart(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    """SIGKILL while a write is inside the block stack; the next backend finishes it."""
    sock = tmp_path / "k.sock"
    slow = (
        f"driver=blkdebug,rules=write:delay=1500,file.driver=raw,file.file.driver=file,"
        f"file.file.filename={image}"
    )
    argv = [*SERVE, "-v", "serve", "--blockdev", slow, "--socket", str(sock), "--no-control"]
    p = start(procs, argv, tmp_path / "serve1.log", sock)
    fe = VhostUserFrontend(sock)
    try:
        fe.negotiate(num_queues=1)
        heads = [
            fe.submit(VirtioBlkRequestType.OUT, 8 * i, data=bytes([0x40 + i]) * 4096)
            for i in range(4)
        ]
        # Wait until the first write is inside the stack (popped: marked in flight).
        import mmap
        import time

        m = mmap.mmap(fe.inflight_fd, fe.inflight_size)
        deadline = time.monotonic() + 20
        while not any(m[16 + 16 * h] for h in heads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(m[16 + 16 * h] for h in heads), "no request went in flight"
        m.close()
        p.kill()
        assert fe.queues[0].used_idx() == 0
        p2 = start(procs, argv, tmp_path / "serve2.log", sock)
        for q in fe.queues:
            q.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            q.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fe.reconnect()
        done = fe.wait(0, 4, timeout=60)
        assert sorted(c.head for c in done) == sorted(heads)
        assert all(c.status == OK for c in done)
        assert "resubmitting 1 requests" in p2.log_path.read_text()
    finally:
        fe.close()
    with open(image, "rb") as f:
        for i in range(4):
            f.seek(8 * i * 512)
            assert f.read(4096) == bytes([0x40 + i]) * 4096


def storage_daemon_argv(
    binary: list[str],
    image: Path,
    sock: Path,
    *,
    writable: bool = True,
    queues: int = 2,
    extra: tuple[str, ...] = (),
) -> list[str]:
    on = {True: "on", False: "off"}
    return [
        *binary,
        "--blockdev",
        f"driver=file,filename={image},node-name=file0,cache.direct=off",
        "--blockdev",
        "driver=raw,file=file0,node-name=disk0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={sock},writable={on[writable]},num-queues={queues}",
        *extra,
    ]


BINARIES = {
    "powercut-storage-daemon": DAEMON,
    "qemu-storage-daemon": ["qemu-storage-daemon"],
}


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_the_same_script_works_with_both_daemons(
    tmp_path: Path, image: Path, procs: list[ManagedProcess], binary: str
) -> None:
    """The compatibility promise: only the binary changes, the behaviour does not."""
    if binary == "qemu-storage-daemon" and shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed")
    sock = tmp_path / "sd.sock"
    p = start(procs, storage_daemon_argv(BINARIES[binary], image, sock), tmp_path / "sd.log", sock)
    with VhostUserFrontend(sock) as fe:
        fe.negotiate(num_queues=2)
        assert fe.config_field("capacity") == (16 << 20) // 512
        assert fe.config_field("num_queues") == 2
        data = os.urandom(65536)
        assert fe.write(128, data).status == OK
        assert fe.read(128, 65536, queue=1).data == data
        assert fe.flush().status == OK
        assert fe.write_zeroes(128, 8).status == OK
        assert fe.read(128, 4096).data == bytes(4096)
        assert fe.read((16 << 20) // 512, 512).status == IOERR
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_exports_are_read_only_unless_writable(
    tmp_path: Path, image: Path, procs: list[ManagedProcess], binary: str
) -> None:
    if binary == "qemu-storage-daemon" and shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed")
    sock = tmp_path / "ro.sock"
    start(
        procs,
        storage_daemon_argv(BINARIES[binary], image, sock, writable=False),
        tmp_path / "ro.log",
        sock,
    )
    with VhostUserFrontend(sock) as fe:
        fe.negotiate(num_queues=1)
        assert fe.features & (1 << VirtioBlkFeature.RO)
        assert fe.read(0, 512).status == OK
        assert fe.write(0, b"w" * 512).status == IOERR


def test_several_exports_and_an_inherited_fd(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    second = tmp_path / "second.img"
    with open(second, "wb") as f:
        f.truncate(4 << 20)
    fd_path = tmp_path / "byfd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(fd_path))
    listener.listen(1)
    fd = listener.fileno()
    sock1 = tmp_path / "one.sock"
    argv = [
        *DAEMON,
        "--object",
        "iothread,id=io0",
        "--blockdev",
        f"driver=file,filename={image},node-name=f0",
        "--blockdev",
        "driver=raw,file=f0,node-name=d0",
        "--blockdev",
        f'{{"driver": "raw", "node-name": "d1", "file": {{"driver": "file", '
        f'"filename": "{second}"}}}}',
        "--export",
        f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock1},"
        "writable=on,iothread=io0",
        "--export",
        f"type=vhost-user-blk,id=e1,node-name=d1,addr.type=fd,addr.str={fd},"
        "writable=on,logical-block-size=4096",
    ]
    try:
        p = start(procs, argv, tmp_path / "multi.log", sock1, pass_fds=[fd])
    finally:
        listener.close()
    with VhostUserFrontend(sock1) as a, VhostUserFrontend(fd_path) as b:
        a.negotiate()
        b.negotiate()
        assert a.config_field("capacity") == (16 << 20) // 512
        assert b.config_field("capacity") == (4 << 20) // 512
        assert b.config_field("blk_size") == 4096
        assert a.write(0, b"a" * 4096).status == OK
        assert b.write(0, b"b" * 4096).status == OK
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert second.read_bytes()[:4096] == b"b" * 4096


def test_storage_daemon_rejects_what_it_does_not_support(tmp_path: Path, image: Path) -> None:
    from harness.storage_daemon import main

    sock = tmp_path / "x.sock"
    base = ["--blockdev", f"driver=file,filename={image},node-name=f0"]
    assert (
        main([*base, "--export", f"type=nbd,id=e,node-name=f0,addr.type=unix,addr.path={sock}"])
        == 1
    )
    assert (
        main(
            [
                *base,
                "--export",
                f"type=vhost-user-blk,id=e,node-name=nope,addr.type=unix,addr.path={sock}",
            ]
        )
        == 1
    )
    assert main(base) == 1
    assert not sock.exists()


def test_serve_control_socket_changes_fault_rules_while_the_guest_runs(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    sock = tmp_path / "f.sock"
    wlog = tmp_path / "w.log"
    spec = (
        f"driver=log-writes,log={wlog},file.driver=blkdebug,file.node-name=dbg,"
        f"file.file.driver=raw,file.file.file.driver=file,file.file.file.filename={image}"
    )
    start(
        procs,
        [*SERVE, "serve", "--blockdev", spec, "--socket", str(sock)],
        tmp_path / "s.log",
        sock,
    )
    ctl = f"{sock}.ctl"
    with VhostUserFrontend(sock) as fe:
        fe.negotiate()
        assert fe.write(0, b"a" * 512).status == OK
        rule = control_request(ctl, {"cmd": "blkdebug-add", "rule": "write:errno=EIO:once"})
        assert fe.write(512, b"b" * 512).status == IOERR  # the rule fired once ...
        assert fe.write(512, b"c" * 512).status == OK  # ... and only once
        (listed,) = control_request(ctl, {"cmd": "blkdebug-rules"})
        assert (listed["id"], listed["fired"]) == (rule, 1)
        control_request(ctl, {"cmd": "blkdebug-remove", "id": rule})
        assert control_request(ctl, {"cmd": "blkdebug-rules"}) == []
        control_request(ctl, {"cmd": "log-mark", "label": "checkpoint"})
        with pytest.raises(PowercutError, match="no blkdebug node 'nope'"):
            control_request(ctl, {"cmd": "blkdebug-clear", "node": "nope"})
    assert [label for _index, label in read_log(wlog).marks] == ["checkpoint"]


def test_fault_commands_on_a_graph_without_fault_drivers_say_what_to_serve(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    sock = tmp_path / "p.sock"
    start(procs, [*SERVE, "serve", str(image), "--socket", str(sock)], tmp_path / "s.log", sock)
    with pytest.raises(PowercutError, match=r"has no blkdebug node.*driver=blkdebug"):
        control_request(f"{sock}.ctl", {"cmd": "blkdebug-rules"})
