"""Real NBD clients (qemu-io, qemu-img, nbdinfo) against the export, in-process and as a daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.nbd.client import NbdClient
from harness.nbd.protocol import NbdCmd
from harness.proc import ManagedProcess

from .conftest import (
    CLI,
    DAEMON,
    IMAGE_SIZE,
    Served,
    canary,
    need,
    run_tool,
    start_process,
    uri,
)

LOGGED = (
    "driver=log-writes,log={dir}/w.log,"
    "file.driver=powerfail,file.journal={dir}/d.journal,"
    "file.file.driver=raw,file.file.file.driver=file,file.file.file.filename={image}"
)


def qemu_io(target: str, *commands: str, read_only: bool = False, check: bool = True) -> str:
    need("qemu-io")
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]  # qemu-io's default is writethrough
    if read_only:
        argv.append("-r")
    for c in commands:
        argv += ["-c", c]
    return run_tool([*argv, target], check=check)


def test_qemu_io_round_trips_data_with_fua_and_flush(serve: Callable[..., Served]) -> None:
    s = serve(LOGGED)
    out = qemu_io(
        s.uri,
        "write -P 0xab 0 64k",
        "write -f -P 0xcd 64k 4k",  # -f: FUA, which QEMU passes through (SEND_FUA)
        "flush",
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 4k",
        "write -z 128k 64k",
        "read -P 0 128k 64k",
        "discard 1M 1M",
    )
    assert "Pattern verification failed" not in out
    stats = s.backend.stats()
    assert stats.fua_writes == 1
    assert stats.ops["flush"].count >= 1
    image = s.image_bytes()
    assert image[:65536] == b"\xab" * 65536
    assert image[65536:69632] == b"\xcd" * 4096
    assert image[(2 << 20) :] == canary()[(2 << 20) :]


def test_qemu_img_sees_the_export_and_copies_from_it(served: Served, tmp_path: Path) -> None:
    need("qemu-img")
    info = run_tool(["qemu-img", "info", "--output=json", served.uri])
    assert f'"virtual-size": {IMAGE_SIZE}' in info
    out = tmp_path / "copy.img"
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(out)])
    assert out.read_bytes() == canary()
    # and back: qemu-img writes the whole export (with zero detection and flushes)
    src = tmp_path / "src.img"
    blob = os.urandom(1 << 20)
    src.write_bytes(blob + bytes(IMAGE_SIZE - len(blob)))
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri])
    assert served.image_bytes() == src.read_bytes()


def test_nbdinfo_reads_what_the_export_advertises(served: Served) -> None:
    need("nbdinfo")
    # --json is the form nbdinfo guarantees; --no-content keeps it from reading the export
    # (without `file` installed, nbdinfo would print the image's first bytes as they are).
    argv = ["nbdinfo", "--json", "--no-content", served.uri]
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    (export,) = json.loads(proc.stdout)["exports"]
    assert export["export-name"] == "disk" and export["export-size"] == IMAGE_SIZE
    for flag in ("can_fua", "can_flush", "can_trim", "can_zero"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False and "content" not in export


def test_read_only_export_refuses_qemu_io_writes(serve: Callable[..., Served]) -> None:
    s = serve(writable=False)
    # QEMU sees NBD_FLAG_READ_ONLY and will not even open it for writing
    out = qemu_io(s.uri, "write -P 1 0 4k", read_only=False, check=False)
    assert "Permission denied" in out
    assert "Pattern" not in qemu_io(s.uri, "read 0 4k", read_only=True)
    assert s.image_bytes() == canary()


def test_several_clients_in_turn_and_at_once(served: Served) -> None:
    for i in range(3):  # in turn: each sees what the one before wrote
        if i:
            qemu_io(served.uri, f"read -P {i} {(i - 1) * 4096} 4k")
        qemu_io(served.uri, f"write -P {i + 1} {i * 4096} 4k")
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            qemu_io(
                served.uri,
                f"write -P {0x40 + n} {(16 + n) * 65536} 64k",
                f"read -P {0x40 + n} {(16 + n) * 65536} 64k",
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    image = served.image_bytes()
    for n in range(4):
        assert image[(16 + n) * 65536 : (17 + n) * 65536] == bytes([0x40 + n]) * 65536
    assert served.server.stats()["connections"] == 9


def test_a_client_killed_mid_request_does_not_stop_the_server(
    serve: Callable[..., Served],
) -> None:
    s = serve(
        "driver=blkdebug,rules=write:delay=800,"
        "file.driver=raw,file.file.driver=file,file.file.filename={image}"
    )
    victim = NbdClient(s.socket)
    victim.handshake("disk")
    victim.send_request(NbdCmd.WRITE, 0, 4096, data=b"v" * 4096)
    blkdebug = s.backend.root
    deadline = time.monotonic() + 10
    while not blkdebug.rules()[0]["fired"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert blkdebug.rules()[0]["fired"] == 1, "the write never reached the graph"
    # the client vanishes with its write inside the graph (a reset, not a goodbye)
    victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    victim.close()
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        c.write(8192, b"n" * 4096)  # waits behind nothing: another connection
        assert c.read(8192, 4096) == b"n" * 4096
    deadline = time.monotonic() + 10
    while s.server.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.server.active == 0
    assert s.server.stats()["dropped"] == 0


# -- the daemon, as a process --------------------------------------------------------


def control_request(path: Path, request: dict) -> dict:
    """One JSON-lines request to a `powercut serve` control socket; its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["ok"], answer
    return answer["result"]


def daemon_argv(image: Path, sock: Path, *extra: str, writable: bool = True) -> list[str]:
    return [
        *DAEMON,
        "--blockdev",
        f"driver=file,filename={image},node-name=file0",
        "--blockdev",
        "driver=raw,file=file0,node-name=disk0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        f"type=nbd,id=e0,node-name=disk0,writable={'on' if writable else 'off'}",
        *extra,
    ]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.img"
    path.write_bytes(canary())
    return path


@pytest.mark.parametrize("binary", ["powercut-storage-daemon", "qemu-storage-daemon"])
def test_the_same_nbd_script_works_with_both_daemons(
    tmp_path: Path, image: Path, procs: list[ManagedProcess], binary: str
) -> None:
    """Only the binary changes: --nbd-server and --export type=nbd as QEMU takes them."""
    if binary == "qemu-storage-daemon":
        need("qemu-storage-daemon")
        argv = ["qemu-storage-daemon", *daemon_argv(image, tmp_path / "s.sock")[3:]]
    else:
        argv = daemon_argv(image, tmp_path / "s.sock")
    sock = tmp_path / "s.sock"
    p = start_process(procs, argv, tmp_path / "d.log", sock)
    target = uri(sock, "disk0")  # the export name defaults to the node name
    qemu_io(target, "write -P 0x5a 4k 8k", "flush", "read -P 0x5a 4k 8k")
    out = qemu_io(target, f"read {IMAGE_SIZE} 512", check=False)
    assert "Input/output error" in out or "Invalid argument" in out
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0
    if binary == "powercut-storage-daemon":
        assert not sock.exists()  # (qemu-storage-daemon 7.2 leaves its NBD socket behind)
    assert image.read_bytes()[4096:12288] == b"\x5a" * 8192


def test_daemon_serves_nbd_over_tcp_on_loopback(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    with socket.socket() as probe:  # a free port on 127.0.0.1
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    marker = tmp_path / "d.pid"
    argv = [
        *DAEMON,
        "--blockdev",
        f"driver=raw,node-name=d0,file.driver=file,file.filename={image}",
        "--nbd-server",
        f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=4",
        "--export",
        "type=nbd,id=e0,node-name=d0,name=tcpdisk,writable=on,description=over tcp",
        "--pidfile",
        str(marker),
    ]
    start_process(procs, argv, tmp_path / "tcp.log", marker)
    qemu_io(f"nbd://127.0.0.1:{port}/tcpdisk", "write -P 7 0 4k", "read -P 7 0 4k")
    with NbdClient(("127.0.0.1", port)) as c:
        c.greeting()
        info = c.info("tcpdisk", (2,))
        assert info.description == "over tcp"


def test_daemon_serves_an_inherited_listening_fd(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    path = tmp_path / "fd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    marker = tmp_path / "fd.pid"
    argv = [
        *DAEMON,
        "--blockdev",
        f"driver=raw,node-name=d0,file.driver=file,file.filename={image}",
        "--nbd-server",
        f"addr.type=fd,addr.str={listener.fileno()}",
        "--export",
        "type=nbd,id=e0,node-name=d0",
        "--pidfile",
        str(marker),
    ]
    try:
        start_process(procs, argv, tmp_path / "fd.log", marker, pass_fds=[listener.fileno()])
    finally:
        listener.close()
    try:
        assert "Pattern" not in qemu_io(uri(path, "d0"), "read 0 4k", read_only=True)
    finally:
        path.unlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--export", "type=nbd,id=e,node-name=f0"], "no --nbd-server"),
        (
            [
                "--nbd-server",
                "addr.type=unix,addr.path={sock}",
                "--export",
                "type=nbd,id=e,node-name=nope",
            ],
            "no --blockdev with node-name=nope",
        ),
        (
            [
                "--nbd-server",
                "addr.type=vsock,addr.cid=3",
                "--export",
                "type=nbd,id=e,node-name=f0",
            ],
            "addr.type=vsock",
        ),
        (
            [
                "--nbd-server",
                "addr.type=unix,addr.path={sock},tls-creds=t0",
                "--export",
                "type=nbd,id=e,node-name=f0",
            ],
            "TLS",
        ),
        (
            [
                "--nbd-server",
                "addr.type=unix,addr.path={sock}",
                "--export",
                "type=nbd,id=e,node-name=f0,bitmaps=b0",
            ],
            "bitmaps",
        ),
        (
            [
                "--nbd-server",
                "addr.type=unix,addr.path={sock}",
                "--nbd-server",
                "addr.type=unix,addr.path={sock}",
                "--export",
                "type=nbd,id=e,node-name=f0",
            ],
            "twice",
        ),
        (["--export", "type=fuse,id=e,node-name=f0,mountpoint=/x"], "type=fuse"),
    ],
)
def test_daemon_refuses_what_it_does_not_serve_and_says_why(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from harness.storage_daemon import main

    sock = tmp_path / "x.sock"
    argv = ["--blockdev", f"driver=file,filename={image},node-name=f0"]
    argv += [a.format(sock=sock) for a in args]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not sock.exists()


def test_serve_nbd_with_the_control_socket(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    sock = tmp_path / "n.sock"
    start_process(procs, [*CLI, "serve", str(image), "--nbd", str(sock)], tmp_path / "s.log", sock)
    ctl = Path(f"{sock}.ctl")
    assert ctl.exists()
    qemu_io(uri(sock, "disk"), "write -P 3 0 4k", "flush")
    control_request(ctl, {"cmd": "write-cache", "enabled": False})
    qemu_io(uri(sock, ""), "write -P 4 4k 4k")  # the empty name finds the one export
    stats = control_request(ctl, {"cmd": "stats"})
    assert stats["nbd"]["connections"] == 2
    assert stats["block"]["fua_writes"] == 1  # write cache off: every write is FUA


def test_serve_offers_vhost_and_nbd_of_one_graph_at_once(
    tmp_path: Path, image: Path, procs: list[ManagedProcess]
) -> None:
    from harness.testing.vhost_frontend import VhostUserFrontend
    from harness.vhost.virtio import VirtioBlkStatus

    vsock, nsock = tmp_path / "v.sock", tmp_path / "n.sock"
    start_process(
        procs,
        [*CLI, "serve", str(image), "--socket", str(vsock), "--nbd", str(nsock)],
        tmp_path / "s.log",
        nsock,
    )
    with VhostUserFrontend(vsock) as fe:
        fe.negotiate()
        assert fe.write(0, b"V" * 4096).status == VirtioBlkStatus.OK
    qemu_io(uri(nsock, "disk"), "read -P 0x56 0 4k")
    assert shutil.which("qemu-io")
    assert subprocess.run(["true"]).returncode == 0
