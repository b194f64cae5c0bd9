"""BlockBackend: requests, bounds, read-only, error policies, O_DIRECT, threads, statistics."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import pytest

from harness.block import ErrorAction, open_backend
from harness.errors import BackendStoppedError, BlockError, BlockRangeError, ReadOnlyError

from .conftest import IMAGE_SIZE


def failing(image: Path, op: str, err: int, count: int = 1, **backend: str) -> str:
    extra = "".join(f",{k}={v}" for k, v in backend.items())
    return (
        f"driver=test-fail,op={op},errno={err},count={count}{extra},"
        f"file.driver=raw,file.file.driver=file,file.file.filename={image}"
    )


def test_written_data_reads_back_and_lands_in_the_file(image: Path) -> None:
    with open_backend(str(image)) as backend:
        assert backend.length == IMAGE_SIZE
        backend.write(8192, b"hello")
        assert backend.read(8190, 9) == b"\0\0hello\0\0"
    with open(image, "rb") as f:
        f.seek(8192)
        assert f.read(5) == b"hello"


def test_readv_and_writev_use_the_callers_buffers(image: Path) -> None:
    with open_backend(str(image)) as backend:
        backend.writev(0, [memoryview(b"ab"), memoryview(b"cd" * 100)])
        a, b = bytearray(3), bytearray(199)
        backend.readv(0, [memoryview(a), memoryview(b)])
        assert bytes(a) + bytes(b) == b"ab" + b"cd" * 100


@pytest.mark.parametrize(
    ("offset", "length"), [(IMAGE_SIZE - 1, 2), (-1, 1), (IMAGE_SIZE, 1), (0, -5)]
)
def test_requests_outside_the_device_are_refused(image: Path, offset: int, length: int) -> None:
    with open_backend(str(image)) as backend:
        with pytest.raises(BlockRangeError, match="outside the device") as info:
            backend.read(offset, max(length, 0)) if length >= 0 else backend.discard(offset, length)
        assert info.value.errno == errno.EIO  # as QEMU's blk_check_byte_request
        with pytest.raises(BlockRangeError):
            backend.write_zeroes(offset, length)
        if length >= 0:
            with pytest.raises(BlockRangeError):
                backend.write(offset, b"\xff" * length)
        assert backend.stats().ops["read"].count == 0
    # Nothing of a refused request reached the image.
    assert image.read_bytes() == bytes(IMAGE_SIZE)


def test_read_only_backend_refuses_every_modification(image: Path) -> None:
    with open_backend(str(image), read_only=True) as backend:
        assert backend.read(0, 16) == bytes(16)
        for call in (
            lambda: backend.write(0, b"x"),
            lambda: backend.discard(0, 4096),
            lambda: backend.write_zeroes(0, 4096),
        ):
            with pytest.raises(ReadOnlyError, match="read-only") as info:
                call()
            assert info.value.errno == errno.EPERM
        backend.flush()  # a no-op, as bdrv_co_flush on a read-only node
    assert os.path.getsize(image) == IMAGE_SIZE


def test_raw_window_maps_offsets_into_the_file(image: Path) -> None:
    spec = f"driver=raw,offset=1M,size=64k,file.driver=file,file.filename={image}"
    with open_backend(spec) as backend:
        assert backend.length == 64 << 10
        backend.write(0, b"window")
        with pytest.raises(BlockRangeError):
            backend.write(64 << 10, b"x")
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(6) == b"window"


def test_raw_window_beyond_the_file_is_refused(image: Path) -> None:
    with pytest.raises(Exception, match="beyond the end"):
        open_backend(f"driver=raw,offset=15M,size=2M,file.driver=file,file.filename={image}")


def test_null_reads_zeroes_and_drops_writes() -> None:
    with open_backend("driver=null,size=1M") as backend:
        backend.write(0, b"gone")
        assert backend.read(0, 4) == bytes(4)
        backend.flush()
        assert backend.length == 1 << 20


def test_write_zeroes_and_discard_zero_the_range(image: Path) -> None:
    with open_backend(str(image)) as backend:
        backend.write(0, b"\xff" * 65536)
        backend.write_zeroes(4096, 4096)
        backend.write_zeroes(16384, 8192, may_unmap=True)
        backend.discard(32768, 4096)
        data = backend.read(0, 65536)
    assert data[4096:8192] == bytes(4096)
    assert data[16384:24576] == bytes(8192)
    assert data[32768:36864] == bytes(4096)  # a punched hole reads as zeroes
    assert data[:4096] == b"\xff" * 4096 and data[8192:16384] == b"\xff" * 8192


def test_discard_ignore_drops_discards(image: Path) -> None:
    spec = f"driver=raw,discard=ignore,file.driver=file,file.filename={image}"
    with open_backend(spec) as backend:
        backend.write(0, b"\xaa" * 4096)
        backend.discard(0, 4096)
        assert backend.read(0, 4096) == b"\xaa" * 4096


# -- error policies ------------------------------------------------------------


def test_report_policy_fails_the_request_with_its_errno(image: Path) -> None:
    with open_backend(failing(image, "write", errno.EIO, werror="report")) as backend:
        with pytest.raises(BlockError, match=r"write of 5 bytes at offset 0 .*failed") as info:
            backend.write(0, b"hello")
        assert info.value.errno == errno.EIO
        backend.write(0, b"hello")  # the next one goes through
        assert backend.read(0, 5) == b"hello"
        assert backend.stats().ops["write"].errors == 1


def test_ignore_policy_completes_the_request_and_counts_the_error(image: Path) -> None:
    with open_backend(failing(image, "read", errno.EIO, rerror="ignore")) as backend:
        assert backend.rerror is ErrorAction.IGNORE
        backend.read(0, 512)
        assert backend.stats().errors_ignored == 1


def test_enospc_policy_stops_on_enospc_and_loses_nothing_after_resume(image: Path) -> None:
    with open_backend(failing(image, "write", errno.ENOSPC)) as backend:
        assert backend.werror is ErrorAction.ENOSPC  # QEMU's default werror
        with pytest.raises(BackendStoppedError, match="resume"):
            backend.write(0, b"data")
        assert backend.stopped is not None
        with pytest.raises(BackendStoppedError):
            backend.read(0, 4)  # nothing runs while stopped
        with pytest.raises(BackendStoppedError):
            backend.flush()
        backend.resume()
        backend.write(0, b"data")  # the retried request lands
        assert backend.read(0, 4) == b"data"


def test_enospc_policy_reports_other_errors(image: Path) -> None:
    with open_backend(failing(image, "write", errno.EIO)) as backend:
        with pytest.raises(BlockError) as info:
            backend.write(0, b"data")
        assert not isinstance(info.value, BackendStoppedError)
        assert backend.stopped is None


def test_stop_policy_stops_on_any_error(image: Path) -> None:
    with open_backend(failing(image, "flush", errno.EIO, werror="stop")) as backend:
        backend.write(0, b"x")
        with pytest.raises(BackendStoppedError):
            backend.flush()
        backend.resume()
        backend.flush()
        assert backend.stats().host_syncs == 1


def test_failed_flush_is_retried_not_elided(image: Path) -> None:
    with open_backend(failing(image, "flush", errno.EIO, werror="report")) as backend:
        backend.write(0, b"x")
        with pytest.raises(BlockError):
            backend.flush()
        backend.flush()  # flushed_gen did not advance, so this one reaches the host
        assert backend.stats().host_syncs == 1


# -- O_DIRECT ------------------------------------------------------------------


def test_o_direct_detects_the_hosts_alignment(image: Path) -> None:
    with open_backend(str(image), cache="none") as backend:
        file_node = backend.root.file
        assert file_node is not None
        assert file_node.request_alignment in (512, 1024, 2048, 4096)
        assert backend.root.request_alignment == file_node.request_alignment


def test_misaligned_requests_under_o_direct_go_through_bounce_buffers(image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(b"\x11" * 8192)
    with open_backend(str(image), cache="directsync") as backend:
        backend.write(100, b"abc")  # misaligned offset and length: read-modify-write
        backend.write(4096, b"\x22" * 4096)  # aligned, but from an unaligned Python buffer
        assert backend.read(99, 5) == b"\x11abc\x11"
        bounced = backend.root.file.bounced  # type: ignore[union-attr]
        assert bounced >= 2
    with open(image, "rb") as f:
        data = f.read(8192)
    assert data[:100] == b"\x11" * 100 and data[100:103] == b"abc"
    assert data[103:4096] == b"\x11" * (4096 - 103)
    assert data[4096:] == b"\x22" * 4096


def test_aligned_buffers_under_o_direct_do_not_bounce(image: Path) -> None:
    buf = mmap.mmap(-1, 8192)
    try:
        view = memoryview(buf)
        view[:] = b"\x33" * 8192
        with open_backend(str(image), cache="none") as backend:
            backend.writev(0, [view])
            back = mmap.mmap(-1, 8192)
            backend.readv(0, [memoryview(back)])
            assert back[:] == b"\x33" * 8192
            back.close()
            assert backend.root.file.bounced == 0  # type: ignore[union-attr]
        view.release()
    finally:
        buf.close()


def test_concurrent_misaligned_writes_under_o_direct_lose_nothing(image: Path) -> None:
    with open_backend(str(image), cache="none") as backend:

        def writer(k: int) -> None:
            for i in range(50):
                backend.write(k * 7 + i * 512 * 8 + 1, bytes([k + 1]) * 7)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(50):
            chunk = backend.read(i * 4096 + 1, 56)
            assert chunk == b"".join(bytes([k + 1]) * 7 for k in range(8))


def test_o_direct_queue_depth_above_one_reaches_the_host(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two reads must be inside preadv(2) at the same moment: the real syscall runs
    # only once a second caller has arrived, so a backend that serializes requests
    # breaks the barrier instead of passing by luck of scheduling.
    both_in_syscall = threading.Barrier(2, timeout=20)
    real_preadv = os.preadv

    def preadv_when_two_in_flight(fd: int, buffers: list[memoryview], offset: int) -> int:
        both_in_syscall.wait()
        return real_preadv(fd, buffers, offset)

    bufs = [mmap.mmap(-1, 65536) for _ in range(2)]
    try:
        with open_backend(str(image), cache="none", name="qd") as backend:
            monkeypatch.setattr(os, "preadv", preadv_when_two_in_flight)
            futures = [
                backend.submit(backend.readv, i * 65536, [memoryview(b)])
                for i, b in enumerate(bufs)
            ]
            for f in futures:
                f.result(timeout=30)
            monkeypatch.undo()
            file_node = backend.root.file
            assert file_node is not None
            assert file_node.max_in_flight == 2  # type: ignore[attr-defined]
    finally:
        for b in bufs:
            b.close()


# -- threads and statistics ------------------------------------------------------


def test_many_threads_write_and_read_their_own_ranges(image: Path) -> None:
    errors: list[BaseException] = []
    with open_backend(str(image)) as backend:

        def worker(k: int) -> None:
            try:
                for i in range(200):
                    off = (k * 200 + i) * 4096
                    backend.write(off, bytes([k]) * 4096)
                    if i % 50 == 0:
                        backend.flush()
                    assert backend.read(off, 4096) == bytes([k]) * 4096
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = backend.stats()
    assert not errors
    assert stats.ops["write"].count == 1200
    assert stats.ops["read"].count == 1200
    assert stats.ops["flush"].count == 24


def test_statistics_count_bytes_latency_and_elided_flushes(image: Path) -> None:
    with open_backend(str(image)) as backend:
        backend.write(0, b"x" * 4096)
        backend.write(4096, b"x" * 512)
        backend.read(0, 1024)
        backend.flush()
        backend.flush()
        backend.discard(0, 4096)
        backend.write_zeroes(0, 8192)
        stats = backend.stats()
    write = stats.ops["write"]
    assert (write.count, write.bytes, write.errors) == (2, 4608, 0)
    assert sum(n for _, n in write.histogram) == 2
    assert write.total_ns > 0 and write.mean_ns > 0
    assert stats.ops["read"].bytes == 1024
    assert stats.ops["discard"].count == 1
    assert stats.ops["write-zeroes"].bytes == 8192
    assert (stats.flushes_issued, stats.flushes_elided) == (1, 1)
    assert stats.to_dict()["ops"]["flush"]["count"] == 2


def test_write_zeroes_falls_back_to_writing_zeroes(image: Path) -> None:
    with open_backend(str(image)) as backend:
        backend.write(0, b"\xee" * 16384)
        file_node = backend.root.file
        assert file_node is not None
        # As if the filesystem had none of file-posix's fallocate modes.
        file_node._has_zero_range = False  # type: ignore[attr-defined]
        file_node._has_punch = False  # type: ignore[attr-defined]
        backend.write_zeroes(4096, 8192, may_unmap=True)
        assert backend.read(0, 16384) == b"\xee" * 4096 + bytes(8192) + b"\xee" * 4096


def test_write_zeroes_on_tmpfs_punches_and_reallocates(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = shm / f"powercut-test-{os.getpid()}.img"
    try:
        with open(path, "wb") as f:
            f.write(b"\x99" * 65536)
        with open_backend(str(path)) as backend:
            backend.write_zeroes(8192, 8192)  # tmpfs has no ZERO_RANGE: punch, then allocate
            assert backend.read(0, 65536) == b"\x99" * 8192 + bytes(8192) + b"\x99" * 49152
        assert os.path.getsize(path) == 65536
    finally:
        path.unlink(missing_ok=True)


def test_alignment_probe_finds_what_o_direct_accepts(image: Path) -> None:
    from harness.block.drivers.file import _probe_align

    with open(image, "r+b") as f:
        f.write(os.urandom(8192))
    fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    try:
        align = _probe_align(fd)
    finally:
        os.close(fd)
    assert align in (512, 1024, 2048, 4096)
    with open_backend(str(image), cache="none") as backend:
        # The alignment in use (statx's, when the kernel reports one) is one reads accept.
        assert backend.root.request_alignment >= align
        assert backend.read(0, 8192)[:16] == image.read_bytes()[:16]


def test_read_modify_write_under_o_direct_never_undoes_an_overlapping_write(image: Path) -> None:
    """A misaligned write (read-modify-write of its block) racing an aligned write of that block
    must end as one order or the other, never with the block's older contents."""
    with open_backend(str(image), cache="none") as backend:
        align = backend.root.request_alignment
        barrier = threading.Barrier(2)
        for i in range(150):
            base = (i % 64) * align
            backend.write(base, b"o" * align)
            new = bytes([65 + i % 26]) * align

            def small(base: int = base) -> None:
                barrier.wait()
                backend.write(base + 1, b"s" * 7)

            t = threading.Thread(target=small)
            t.start()
            barrier.wait()
            backend.write(base, new)
            t.join()
            block = backend.read(base, align)
            assert block in (new, new[:1] + b"s" * 7 + new[8:]), f"iteration {i}: {block[:16]!r}"


def test_latency_percentiles_come_from_the_histogram() -> None:
    with open_backend("driver=null,size=1M,latency-ns=2000000") as backend:
        for _ in range(5):
            backend.read(0, 512)
        read = backend.stats().ops["read"]
    assert read.count == 5
    assert 2_000_000 <= read.percentile_ns(50) <= read.percentile_ns(99)
    assert read.percentile_ns(99) <= 2 * max(le for le, _ in read.histogram)
    assert read.to_dict()["p99_ns_at_most"] == read.percentile_ns(99)
