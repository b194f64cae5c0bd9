"""Requests against the real server and a real node graph: each maps to one block request."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.block import ErrorAction
from harness.errors import UnsupportedError
from harness.nbd.client import NbdClient, NbdReplyError
from harness.nbd.protocol import (
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EPERM,
    CmdFlag,
    NbdCmd,
)

from .conftest import CLI, IMAGE_SIZE, Served, canary

LOGGED = (
    "driver=log-writes,log={dir}/w.log,"
    "file.driver=powerfail,file.journal={dir}/d.journal,"
    "file.file.driver=raw,file.file.file.driver=file,file.file.file.filename={image}"
)


def write_log(path: Path) -> dict:
    out = subprocess.run(
        [*CLI, "log", "show", "--json", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_writes_read_back_and_reach_the_image(served: Served) -> None:
    data = os.urandom(1 << 20)
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        c.write(4096, data)
        c.write(3, b"odd")  # byte granularity: the minimum block size is 1
        assert c.read(4096, len(data)) == data
        assert c.read(0, 8) == canary()[:3] + b"odd" + canary()[6:8]
        c.disconnect()
    image = served.image_bytes()
    assert image[4096 : 4096 + len(data)] == data
    assert image[(1 << 20) + 4096 :] == canary()[(1 << 20) + 4096 :]


def test_fua_writes_and_flushes_reach_the_graph_as_fua_and_flush(
    serve: Callable[..., Served],
) -> None:
    s = serve(LOGGED)
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        c.write(0, b"a" * 4096)
        c.write(4096, b"b" * 4096, fua=True)
        c.flush()
        c.write_zeroes(8192, 4096, flags=CmdFlag.FUA)
        c.trim(1 << 20, 65536)
        c.disconnect()
    stats = s.backend.stats()
    assert stats.fua_writes == 2  # the FUA write and the FUA write-zeroes, nothing else
    s.server.close()
    s.backend.close()
    log = write_log(s.workdir / "w.log")
    entries = [(e["op"], e["offset"], e["fua"]) for e in log["entries"]]
    assert entries == [
        ("write", 0, False),
        ("write", 4096, True),
        ("flush", 0, False),
        ("write-zeroes", 8192, True),
        ("discard", 1 << 20, False),
        ("flush", 0, False),  # BlockBackend.close flushes, as bdrv_close does
    ]
    assert all(e["write_cache"] is True for e in log["entries"])


@pytest.mark.parametrize("flushed", [True, False])
def test_a_flush_makes_the_powerfail_journal_durable(
    serve: Callable[..., Served], flushed: bool
) -> None:
    s = serve(LOGGED)
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        c.write(0, b"kept" * 1024)
        if flushed:
            c.flush()
        c.write(65536, b"lost" * 1024)  # never flushed
    # Close without the backend's own closing flush: a host power cut right now.
    s.server.close()
    s.backend.graph.close()
    subprocess.run(
        [
            *CLI,
            "cut",
            str(s.image),
            "--journal",
            str(s.workdir / "d.journal"),
            "--policy",
            "lose-all",
        ],
        check=True,
        capture_output=True,
    )
    image = s.image_bytes()
    assert image[65536 : 65536 + 4096] == canary()[65536 : 65536 + 4096]
    if flushed:
        assert image[:4096] == b"kept" * 1024
    else:
        assert image[:4096] == canary()[:4096]


@pytest.mark.parametrize("fua", [True, False])
def test_a_fua_trim_is_flushed_before_its_reply(serve: Callable[..., Served], fua: bool) -> None:
    s = serve(LOGGED)
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        c.write(65536, b"data" * 1024)
        c.flush()
        c.trim(65536, 4096, fua=fua)
        assert c.read(65536, 4096) == bytes(4096)
    # Close without the backend's own closing flush: a host power cut right now.
    s.server.close()
    s.backend.graph.close()
    log = write_log(s.workdir / "w.log")
    ops = [(e["op"], e["offset"]) for e in log["entries"]]
    assert ops == [("write", 65536), ("flush", 0), ("discard", 65536)] + (
        [("flush", 0)] if fua else []
    )
    subprocess.run(
        [
            *CLI,
            "cut",
            str(s.image),
            "--journal",
            str(s.workdir / "d.journal"),
            "--policy",
            "lose-all",
        ],
        check=True,
        capture_output=True,
    )
    # With FUA the trim was stable when the client heard of it: the cut cannot undo it.
    trimmed = s.image_bytes()[65536 : 65536 + 4096]
    assert trimmed == (bytes(4096) if fua else b"data" * 1024)


def test_fua_write_is_durable_without_a_flush(serve: Callable[..., Served]) -> None:
    s = serve(LOGGED)
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        c.write(0, b"F" * 4096, fua=True)
    s.server.close()
    s.backend.graph.close()
    subprocess.run(
        [
            *CLI,
            "cut",
            str(s.image),
            "--journal",
            str(s.workdir / "d.journal"),
            "--policy",
            "lose-all",
        ],
        check=True,
        capture_output=True,
    )
    assert s.image_bytes()[:4096] == b"F" * 4096


def test_requests_outside_the_export_get_errors_and_touch_nothing(served: Served) -> None:
    end = IMAGE_SIZE
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        assert c.request(NbdCmd.READ, end - 512, 1024)[0] == NBD_EINVAL
        assert c.request(NbdCmd.READ, 1 << 63, 512)[0] == NBD_EINVAL
        assert c.request(NbdCmd.WRITE, end - 512, 1024, data=b"x" * 1024)[0] == NBD_ENOSPC
        assert c.request(NbdCmd.WRITE, (1 << 64) - 512, 512, data=b"y" * 512)[0] == NBD_ENOSPC
        assert c.request(NbdCmd.WRITE_ZEROES, end, 1)[0] == NBD_ENOSPC
        assert c.request(NbdCmd.TRIM, end - 1, 2)[0] == NBD_EINVAL
        assert c.request(NbdCmd.READ, 0, (32 << 20) + 1)[0] == NBD_EINVAL
        # the connection is still in step: the refused write's payload was consumed
        assert c.read(end - 512, 512) == canary()[-512:]
    assert served.image_bytes() == canary()


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (NbdCmd.READ, CmdFlag.DF),
        (NbdCmd.READ, CmdFlag.NO_HOLE),
        (NbdCmd.WRITE, CmdFlag.FAST_ZERO),
        (NbdCmd.FLUSH, CmdFlag.NO_HOLE),
        (NbdCmd.TRIM, CmdFlag.REQ_ONE),
        (NbdCmd.WRITE_ZEROES, CmdFlag.DF),
        (NbdCmd.WRITE_ZEROES, 0x8000),
        (NbdCmd.CACHE, 0),
        (NbdCmd.BLOCK_STATUS, 0),
        (NbdCmd.RESIZE, 0),
        (99, 0),
    ],
)
def test_flags_and_commands_not_valid_get_einval(served: Served, cmd: int, flags: int) -> None:
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        data = b"w" * 512 if cmd == NbdCmd.WRITE else b""
        length = 0 if cmd == NbdCmd.FLUSH else 512
        assert c.request(cmd, 0, length, flags=flags, data=data)[0] == NBD_EINVAL
        assert c.read(0, 512) == canary()[:512]
    assert served.image_bytes() == canary()


def test_flush_with_an_offset_or_length_is_invalid(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        assert c.request(NbdCmd.FLUSH, 512, 0)[0] == NBD_EINVAL
        assert c.request(NbdCmd.FLUSH, 0, 512)[0] == NBD_EINVAL
        assert c.request(NbdCmd.FLUSH, flags=CmdFlag.FUA)[0] == 0  # FUA is valid everywhere


def test_a_read_only_export_refuses_modifications_with_eperm(
    serve: Callable[..., Served],
) -> None:
    s = serve(writable=False)
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        assert c.request(NbdCmd.WRITE, 0, 512, data=b"w" * 512)[0] == NBD_EPERM
        assert c.request(NbdCmd.WRITE_ZEROES, 0, 512)[0] == NBD_EPERM
        assert c.request(NbdCmd.TRIM, 0, 512)[0] == NBD_EPERM
        assert c.request(NbdCmd.FLUSH)[0] == 0
        assert c.read(0, 512) == canary()[:512]
    assert s.image_bytes() == canary()


def test_trim_and_write_zeroes_read_back_as_zeroes(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        c.write_zeroes(4096, 8192)
        c.write_zeroes(65536, 4096, flags=CmdFlag.NO_HOLE)
        c.write_zeroes(131072, 0)  # zero length: nothing to do, and no error
        c.trim(1 << 20, 1 << 20, fua=True)
        assert c.read(4096, 8192) == bytes(8192)
        assert c.read(65536, 4096) == bytes(4096)
    image = served.image_bytes()
    assert image[4096:12288] == bytes(8192)
    assert image[12288:65536] == canary()[12288:65536]
    assert image[(2 << 20) :] == canary()[(2 << 20) :]


def test_fast_zero_zeroes_where_the_host_can_and_says_enotsup_where_it_cannot(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        c.write_zeroes(0, 65536, flags=CmdFlag.FAST_ZERO)  # fallocate: fast
        assert c.read(0, 65536) == bytes(65536)

        def slow_only(offset: int, length: int, flags: object) -> None:
            raise UnsupportedError("this host would have to write a buffer of zeroes")

        monkeypatch.setattr(served.backend.root, "pwrite_zeroes", slow_only)
        served.backend.werror = ErrorAction.STOP  # a fast-zero refusal is no I/O error
        assert c.request(NbdCmd.WRITE_ZEROES, 65536, 4096, flags=CmdFlag.FAST_ZERO)[0] == (
            NBD_ENOTSUP
        )
        assert served.backend.stopped is None
        assert c.read(65536, 4096) == canary()[65536 : 65536 + 4096]


def test_host_errnos_map_to_the_nbd_error_values() -> None:
    import errno

    from harness.nbd.protocol import nbd_error

    assert nbd_error(errno.ENOTSUP) == NBD_ENOTSUP
    assert nbd_error(errno.EDQUOT) == NBD_ENOSPC
    assert nbd_error(errno.EROFS) == NBD_EPERM
    assert nbd_error(errno.ENOENT) == 5  # anything unlisted is EIO
    assert nbd_error(None) == 5


def test_pipelined_requests_are_all_answered(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        handles = {}
        for i in range(64):
            h = c.send_request(NbdCmd.WRITE, i * 4096, 4096, data=bytes([i]) * 4096)
            handles[h] = i
        got = {c.recv_reply()[0] for _ in range(64)}
        assert got == set(handles)
        reads = [c.send_request(NbdCmd.READ, i * 4096, 4096) for i in range(64)]
        for h in reads:
            handle, error, data = c.recv_reply(4096)
            assert (handle, error) == (h, 0)
            assert data == bytes([reads.index(h)]) * 4096


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_and_inline_serving_agree(serve: Callable[..., Served], parallel: bool) -> None:
    s = serve(parallel=parallel)
    blobs = {i: os.urandom(65536) for i in range(16)}
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        hs = [c.send_request(NbdCmd.WRITE, i * 65536, 65536, data=b) for i, b in blobs.items()]
        assert sorted(c.recv_reply()[0] for _ in hs) == sorted(hs)
        c.flush()
        for i, b in blobs.items():
            assert c.read(i * 65536, 65536) == b
    assert s.image_bytes()[: 16 * 65536] == b"".join(blobs.values())


def test_disconnect_ends_only_that_client(served: Served) -> None:
    with NbdClient(served.socket) as a, NbdClient(served.socket) as b:
        a.handshake("disk")
        b.handshake("disk")
        a.write(0, b"A" * 512)
        a.disconnect()
        assert b.read(0, 512) == b"A" * 512
    stats = served.server.stats()
    assert stats["connections"] == 2 and stats["dropped"] == 0


def test_a_failing_graph_reports_the_errno_to_the_client(serve: Callable[..., Served]) -> None:
    s = serve(
        "driver=blkdebug,rules=write:errno=ENOSPC:once;read:errno=EIO:once,"
        "file.driver=raw,file.file.driver=file,file.file.filename={image}"
    )
    with NbdClient(s.socket) as c:
        c.handshake("disk")
        with pytest.raises(NbdReplyError) as exc:
            c.write(0, b"z" * 512)
        assert exc.value.error == NBD_ENOSPC
        assert c.request(NbdCmd.READ, 0, 512)[0] == 5  # EIO, and no payload follows
        assert c.read(0, 512) == canary()[:512]
