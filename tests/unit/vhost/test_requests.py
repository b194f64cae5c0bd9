"""Every virtio-blk request type through the real server and the real block stack."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from harness.testing.vhost_frontend import Seg, VhostUserFrontend
from harness.vhost.virtio import (
    VirtioBlkFeature,
    VirtioBlkOuthdr,
    VirtioBlkRequestType,
    VirtioBlkStatus,
)

from .conftest import IMAGE_SIZE, Served

OK, IOERR, UNSUPP = VirtioBlkStatus.OK, VirtioBlkStatus.IOERR, VirtioBlkStatus.UNSUPP


def image_bytes(served: Served, offset: int, length: int) -> bytes:
    with open(served.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_write_reaches_the_image_and_reads_back(served: Served, fe: VhostUserFrontend) -> None:
    data = os.urandom(8192)
    c = fe.write(16, data)
    assert (c.status, c.length) == (OK, 1)
    assert image_bytes(served, 16 * 512, 8192) == data
    r = fe.read(16, 8192)
    assert (r.status, r.length) == (OK, 8193)
    assert r.data == data


@pytest.mark.parametrize("indirect", [False, True])
def test_scattered_buffers_and_indirect_tables(fe: VhostUserFrontend, indirect: bool) -> None:
    data = os.urandom(16384)
    assert fe.write(64, data, split=512, indirect=indirect).status == OK
    r = fe.read(64, 16384, split=1536, indirect=indirect)
    assert r.status == OK and r.data == data


def test_header_and_data_in_one_descriptor(fe: VhostUserFrontend) -> None:
    """VERSION_1 means any layout: the header may share a descriptor with the data."""
    data = os.urandom(4096)
    buf = fe.mem.alloc(16 + 4096)
    fe.mem.write(buf, VirtioBlkOuthdr.pack(VirtioBlkRequestType.OUT, 0, 8) + data)
    status = fe.mem.alloc(1)
    fe.submit_raw([Seg(buf, 16 + 4096), Seg(status, 1, True)], status_addr=status)
    assert fe.wait()[0].status == OK
    assert fe.read(8, 4096).data == data


def test_flush_reaches_the_host(served: Served, fe: VhostUserFrontend) -> None:
    fe.write(0, b"x" * 4096)
    before = served.backend.stats().host_syncs
    assert fe.flush().status == OK
    assert served.backend.stats().host_syncs == before + 1


def test_get_id_returns_the_serial(fe: VhostUserFrontend) -> None:
    c = fe.get_id()
    assert c.status == OK
    assert c.data.rstrip(b"\0") == b"powercut-test"


def test_get_id_truncates_a_long_serial_to_20_bytes(serve: Callable[..., Served]) -> None:
    s = serve(serial="0123456789abcdefghijKLMN")
    with s.frontend() as fe:
        c = fe.get_id()
        assert c.data == b"0123456789abcdefghij" and c.length == 21


def test_discard_succeeds_and_write_zeroes_zeroes(served: Served, fe: VhostUserFrontend) -> None:
    fe.write(0, b"\xaa" * 65536)
    assert fe.discard(0, 8).status == OK
    assert fe.write_zeroes(16, 16).status == OK
    assert fe.write_zeroes(32, 16, unmap=True).status == OK
    data = image_bytes(served, 0, 65536)
    assert data[16 * 512 : 48 * 512] == bytes(32 * 512)
    assert data[48 * 512 :] == b"\xaa" * (65536 - 48 * 512)


def test_discard_with_the_unmap_flag_is_unsupported(fe: VhostUserFrontend) -> None:
    assert fe.discard(0, 8, flags=1).status == UNSUPP


def test_write_zeroes_with_unknown_flags_is_unsupported(fe: VhostUserFrontend) -> None:
    from harness.vhost.virtio import VirtioBlkDiscardWriteZeroes

    seg = VirtioBlkDiscardWriteZeroes.pack(0, 8, 0x6)
    assert fe.run(VirtioBlkRequestType.WRITE_ZEROES, data=seg).status == UNSUPP


def test_more_segments_than_advertised_is_unsupported(fe: VhostUserFrontend) -> None:
    from harness.vhost.virtio import VirtioBlkDiscardWriteZeroes

    segs = VirtioBlkDiscardWriteZeroes.pack(0, 8, 0) * 2
    assert fe.config_field("max_discard_seg") == 1
    assert fe.run(VirtioBlkRequestType.DISCARD, data=segs).status == UNSUPP


def test_segment_list_of_odd_length_is_an_io_error(fe: VhostUserFrontend) -> None:
    assert fe.run(VirtioBlkRequestType.DISCARD, data=b"\0" * 10).status == IOERR


@pytest.mark.parametrize(
    "rtype", [VirtioBlkRequestType.GET_LIFETIME, VirtioBlkRequestType.SECURE_ERASE, 3, 99]
)
def test_unknown_or_unoffered_types_are_unsupported(fe: VhostUserFrontend, rtype: int) -> None:
    assert fe.run(rtype, in_len=16).status == UNSUPP


def test_requests_beyond_the_disk_fail(fe: VhostUserFrontend) -> None:
    last = IMAGE_SIZE // 512
    assert fe.read(last - 8, 4096).status == OK
    assert fe.read(last - 7, 4096).status == IOERR
    assert fe.write(last, b"x" * 512).status == IOERR
    assert fe.write_zeroes(last - 1, 2).status == IOERR
    assert fe.discard(last + 100, 8).status == IOERR
    assert fe.read(1 << 60, 512).status == IOERR


def test_misaligned_requests_fail_with_4k_logical_blocks(serve: Callable[..., Served]) -> None:
    s = serve(block_size=4096)
    with s.frontend() as fe:
        assert fe.config_field("blk_size") == 4096
        assert fe.write(8, b"y" * 4096).status == OK
        assert fe.write(9, b"y" * 4096).status == IOERR
        assert fe.write(8, b"y" * 512).status == IOERR
        assert fe.read(8, 2048).status == IOERR
        assert fe.discard(4, 8).status == IOERR


def test_read_only_disk(serve: Callable[..., Served]) -> None:
    s = serve(read_only=True)
    with s.frontend() as fe:
        assert fe.features & (1 << VirtioBlkFeature.RO)
        assert not fe.features & (1 << VirtioBlkFeature.DISCARD)
        assert fe.read(0, 4096).status == OK
        assert fe.write(0, b"z" * 512).status == IOERR
        assert fe.discard(0, 8).status == IOERR
        assert fe.write_zeroes(0, 8).status == IOERR
        assert fe.flush().status == OK
    assert image_bytes(s, 0, 512) == bytes(512)


def test_writethrough_writes_carry_fua(serve: Callable[..., Served]) -> None:
    s = serve(cache="writethrough")
    with s.frontend() as fe:
        assert fe.config_field("writeback") == 0
        fe.write(0, b"w" * 4096)
        assert s.backend.stats().fua_writes == 1


def test_guest_write_cache_toggle_changes_fua(serve: Callable[..., Served]) -> None:
    s = serve(cache="writeback")
    with s.frontend() as fe:
        assert fe.config_field("writeback") == 1
        fe.write(0, b"a" * 4096)
        assert s.backend.stats().fua_writes == 0
        assert fe.set_config(32, b"\x00") == 0  # guest: echo "write through" > cache_type
        assert not s.backend.enable_write_cache
        assert fe.get_config(32, 1) == b"\x00"
        fe.write(0, b"b" * 4096)
        assert s.backend.stats().fua_writes == 1
        assert fe.set_config(32, b"\x01") == 0
        fe.write(0, b"c" * 4096)
        assert s.backend.stats().fua_writes == 1


def test_queues_run_in_parallel(serve: Callable[..., Served]) -> None:
    s = serve(num_queues=4)
    with s.frontend(num_queues=4) as fe:
        errors: list[BaseException] = []

        def worker(q: int) -> None:
            try:
                for i in range(20):
                    data = bytes([q * 16 + i % 16]) * 4096
                    sector = (q * 64 + i % 8) * 8
                    for _ in range(3):
                        fe.submit(VirtioBlkRequestType.OUT, sector, data=data, queue=q)
                    assert all(c.status == OK for c in fe.wait(q, 3))
                    assert fe.read(sector, 4096, queue=q).data == data
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        stats = s.server.stats()
        assert all(q["completed"] >= 80 for q in stats["queues"])


def test_many_requests_in_flight_complete_in_any_order(fe: VhostUserFrontend) -> None:
    heads = [fe.submit(VirtioBlkRequestType.OUT, 8 * i, data=bytes([i]) * 4096) for i in range(40)]
    done = fe.wait(0, 40)
    assert sorted(c.head for c in done) == sorted(heads)
    assert all(c.status == OK for c in done)
    for i in (0, 17, 39):
        assert fe.read(8 * i, 4096).data == bytes([i]) * 4096


def test_event_idx_asks_for_the_next_kick_only(fe: VhostUserFrontend) -> None:
    from harness.vhost.virtio import VirtioFeature

    assert fe.features & (1 << VirtioFeature.RING_EVENT_IDX)
    q = fe.queues[0]
    kicks = q.kicks
    for i in range(40):
        fe.submit(VirtioBlkRequestType.IN, 8 * i, in_len=4096)
    fe.wait(0, 40)
    assert q.kicks - kicks <= 40
    # Idle again (the device publishes its event just after the last completion):
    # it wants a kick for exactly the next entry.
    deadline = time.monotonic() + 5
    while q.used16[2 + 4 * q.num] != q.avail_idx and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.used16[2 + 4 * q.num] == q.avail_idx


def test_without_event_idx_and_indirect_the_ring_still_works(serve: Callable[..., Served]) -> None:
    from harness.vhost.virtio import VirtioFeature

    s = serve()
    mask = ~((1 << VirtioFeature.RING_EVENT_IDX) | (1 << VirtioFeature.RING_INDIRECT_DESC))
    with s.frontend(features=mask & ((1 << 64) - 1)) as fe:
        data = os.urandom(4096)
        assert fe.write(0, data, split=1024).status == OK
        assert fe.read(0, 4096).data == data


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_large_requests_complete_out_of_order_on_helper_threads(
    serve: Callable[..., Served], cache: str
) -> None:
    """With O_DIRECT, data requests overlap on helper threads and complete out of order."""
    s = serve(cache=cache)
    assert s.server.parallel_min == (0 if cache == "writeback" else 4096)
    with s.frontend(num_queues=1) as fe:
        blobs = [os.urandom(256 * 1024) for _ in range(6)]
        heads = [
            fe.submit(VirtioBlkRequestType.OUT, 512 * i, data=b, split=65536)
            for i, b in enumerate(blobs)
        ]
        small = fe.submit(VirtioBlkRequestType.FLUSH)
        done = fe.wait(0, 7)
        assert sorted(c.head for c in done) == sorted([*heads, small])
        assert all(c.status == OK for c in done)
        for i, b in enumerate(blobs):
            assert fe.read(512 * i, len(b)).data == b


def test_o_direct_mixed_load_on_helper_threads(serve: Callable[..., Served]) -> None:
    s = serve(cache="none", num_queues=2)
    with s.frontend(num_queues=2) as fe:
        for q in (0, 1):
            heads = [
                fe.submit(
                    VirtioBlkRequestType.OUT, 8 * (i + 40 * q), data=bytes([i + q]) * 4096, queue=q
                )
                for i in range(30)
            ]
            heads.append(fe.submit(VirtioBlkRequestType.FLUSH, queue=q))
            done = fe.wait(q, len(heads))
            assert sorted(c.head for c in done) == sorted(heads)
            assert all(c.status == OK for c in done)
        for q in (0, 1):
            for i in (0, 13, 29):
                assert fe.read(8 * (i + 40 * q), 4096, queue=q).data == bytes([i + q]) * 4096
        assert fe.read(IMAGE_SIZE // 512, 512).status == IOERR
