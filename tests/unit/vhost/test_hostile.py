"""Malformed and hostile rings: every case ends in a status or in NEEDS_RESET, never a crash."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from harness.testing.vhost_frontend import Seg, VhostUserFrontend
from harness.vhost.protocol import VhostUserRequest
from harness.vhost.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceStatus,
    Le16,
    VirtioBlkOuthdr,
    VirtioBlkRequestType,
    VirtioBlkStatus,
    VirtqDesc,
)

from .conftest import Served

OK, IOERR = VirtioBlkStatus.OK, VirtioBlkStatus.IOERR
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def header(fe: VhostUserFrontend, rtype: int = VirtioBlkRequestType.IN, sector: int = 0) -> int:
    addr = fe.mem.alloc(16)
    fe.mem.write(addr, VirtioBlkOuthdr.pack(rtype, 0, sector))
    return addr


def status_byte(fe: VhostUserFrontend) -> int:
    addr = fe.mem.alloc(1)
    fe.mem.write(addr, b"\xee")
    return addr


def publish_descs(
    fe: VhostUserFrontend, descs: dict[int, tuple[int, int, int, int]], head: int, queue: int = 0
) -> None:
    """Write raw descriptors (index -> addr, len, flags, next) and make `head` available."""
    q = fe.queues[queue]
    for i, (addr, length, flags, nxt) in descs.items():
        q.write_desc(i, addr, length, flags, nxt)
    q.publish(head)


def needs_reset(fe: VhostUserFrontend) -> bool:
    return bool(fe.get_u64(VhostUserRequest.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET)


def assert_broken_and_alive(fe: VhostUserFrontend, served: Served) -> None:
    """The ring is reported broken; the backend, its other queue and a reset all still work."""
    assert fe.err_signalled(0, timeout=10), "err eventfd was not signalled"
    assert needs_reset(fe)
    assert served.server.stats()["needs_reset_events"] >= 1
    # Queue 1 is untouched by queue 0's breakage.
    assert fe.write(8, b"q" * 512, queue=1).status == OK
    # A device reset (what the guest driver does on NEEDS_RESET) brings queue 0 back.
    fe.reset_device()
    assert not needs_reset(fe)
    assert fe.read(8, 512).data == b"q" * 512


def test_descriptor_loop(served: Served, fe: VhostUserFrontend) -> None:
    hdr, st = header(fe), status_byte(fe)
    publish_descs(fe, {0: (hdr, 16, NEXT, 1), 1: (st, 1, WRITE | NEXT, 0)}, head=0)
    assert_broken_and_alive(fe, served)


def test_self_loop(served: Served, fe: VhostUserFrontend) -> None:
    publish_descs(fe, {5: (header(fe), 16, NEXT, 5)}, head=5)
    assert_broken_and_alive(fe, served)


def test_next_out_of_range(served: Served, fe: VhostUserFrontend) -> None:
    publish_descs(fe, {0: (header(fe), 16, NEXT, 500)}, head=0)
    assert_broken_and_alive(fe, served)


def test_head_out_of_range(served: Served, fe: VhostUserFrontend) -> None:
    q = fe.queues[0]
    fe.mem.write(q.avail_addr + 4, Le16.pack(1000))
    q.avail_idx = 1
    fe.mem.write(q.avail_addr + 2, Le16.pack(1))
    q.kick()
    assert_broken_and_alive(fe, served)


def test_avail_index_running_ahead_of_the_ring(served: Served, fe: VhostUserFrontend) -> None:
    q = fe.queues[0]
    q.avail_idx = 500
    fe.mem.write(q.avail_addr + 2, Le16.pack(500))
    q.kick()
    assert_broken_and_alive(fe, served)


def indirect_table(fe: VhostUserFrontend, entries: list[tuple[int, int, int, int]]) -> int:
    table = fe.mem.alloc(16 * len(entries), 16)
    for i, e in enumerate(entries):
        fe.mem.write(table + 16 * i, VirtqDesc.pack(*e))
    return table


def test_nested_indirect_table(served: Served, fe: VhostUserFrontend) -> None:
    inner = indirect_table(fe, [(header(fe), 16, NEXT, 1), (status_byte(fe), 1, WRITE, 0)])
    outer = indirect_table(fe, [(inner, 32, INDIRECT, 0)])
    publish_descs(fe, {0: (outer, 16, INDIRECT, 0)}, head=0)
    assert_broken_and_alive(fe, served)


@pytest.mark.parametrize("length", [0, 17, 8])
def test_bad_indirect_length(served: Served, fe: VhostUserFrontend, length: int) -> None:
    table = indirect_table(fe, [(header(fe), 16, NEXT, 1), (status_byte(fe), 1, WRITE, 0)])
    publish_descs(fe, {0: (table, length, INDIRECT, 0)}, head=0)
    assert_broken_and_alive(fe, served)


def test_indirect_with_next_set(served: Served, fe: VhostUserFrontend) -> None:
    table = indirect_table(fe, [(header(fe), 16, NEXT, 1), (status_byte(fe), 1, WRITE, 0)])
    publish_descs(
        fe, {0: (table, 32, INDIRECT | NEXT, 1), 1: (status_byte(fe), 1, WRITE, 0)}, head=0
    )
    assert_broken_and_alive(fe, served)


def test_indirect_table_outside_guest_memory(served: Served, fe: VhostUserFrontend) -> None:
    publish_descs(fe, {0: (0xDEAD_0000_0000, 32, INDIRECT, 0)}, head=0)
    assert_broken_and_alive(fe, served)


def test_loop_inside_an_indirect_table(served: Served, fe: VhostUserFrontend) -> None:
    table = indirect_table(fe, [(header(fe), 16, NEXT, 1), (status_byte(fe), 1, WRITE | NEXT, 0)])
    publish_descs(fe, {0: (table, 32, INDIRECT, 0)}, head=0)
    assert_broken_and_alive(fe, served)


def test_writable_before_readable_is_an_io_error(fe: VhostUserFrontend) -> None:
    data = fe.mem.alloc(512)
    st = status_byte(fe)
    fe.submit_raw(
        [Seg(data, 512, True), Seg(header(fe, VirtioBlkRequestType.OUT), 16), Seg(st, 1, True)],
        status_addr=st,
    )
    assert fe.wait()[0].status == IOERR


@pytest.mark.parametrize("hdr_len", [0, 8, 15])
def test_missing_or_short_header_is_an_io_error(fe: VhostUserFrontend, hdr_len: int) -> None:
    st = status_byte(fe)
    segs = [Seg(header(fe), hdr_len)] if hdr_len else []
    fe.submit_raw([*segs, Seg(st, 1, True)], status_addr=st)
    c = fe.wait()[0]
    assert (c.status, c.length) == (IOERR, 1)


def test_header_split_over_descriptors_is_fine(fe: VhostUserFrontend) -> None:
    hdr = header(fe, VirtioBlkRequestType.IN, 0)
    data = fe.mem.alloc(512)
    st = status_byte(fe)
    fe.submit_raw(
        [Seg(hdr, 5), Seg(hdr + 5, 11), Seg(data, 512, True), Seg(st, 1, True)], status_addr=st
    )
    assert fe.wait()[0].status == OK


def test_no_writable_descriptor_needs_reset(served: Served, fe: VhostUserFrontend) -> None:
    fe.submit_raw([Seg(header(fe, VirtioBlkRequestType.FLUSH), 16)])
    assert_broken_and_alive(fe, served)


def test_read_only_status_byte_needs_reset(served: Served, fe: VhostUserFrontend) -> None:
    data = fe.mem.alloc(512)
    fe.submit_raw([Seg(header(fe), 16), Seg(data, 512, True), Seg(status_byte(fe), 1)])
    assert_broken_and_alive(fe, served)


def test_empty_status_descriptor_needs_reset(served: Served, fe: VhostUserFrontend) -> None:
    fe.submit_raw([Seg(header(fe, VirtioBlkRequestType.FLUSH), 16), Seg(status_byte(fe), 0, True)])
    assert_broken_and_alive(fe, served)


def test_status_byte_outside_guest_memory_needs_reset(
    served: Served, fe: VhostUserFrontend
) -> None:
    fe.submit_raw([Seg(header(fe, VirtioBlkRequestType.FLUSH), 16), Seg(0xDEAD_0000_0000, 1, True)])
    assert_broken_and_alive(fe, served)


@pytest.mark.parametrize("addr", [0, 0xDEAD_0000_0000, (1 << 64) - 256])
def test_data_outside_guest_memory_is_an_io_error(fe: VhostUserFrontend, addr: int) -> None:
    st = status_byte(fe)
    fe.submit_raw(
        [Seg(header(fe, VirtioBlkRequestType.IN), 16), Seg(addr, 512, True), Seg(st, 1, True)],
        status_addr=st,
    )
    assert fe.wait()[0].status == IOERR


def test_data_running_off_the_end_of_a_region(fe: VhostUserFrontend) -> None:
    region = fe.mem.regions[0]
    end = region.guest_addr + region.size
    st = status_byte(fe)
    fe.submit_raw(
        [Seg(header(fe, VirtioBlkRequestType.IN), 16), Seg(end - 256, 512, True), Seg(st, 1, True)],
        status_addr=st,
    )
    assert fe.wait()[0].status == IOERR


def test_memory_the_backend_was_not_given_is_never_touched(serve: Callable[..., Served]) -> None:
    """Region 2 exists in the frontend but was never sent: reads into it fail, it stays intact."""
    s = serve()
    fe = VhostUserFrontend(s.socket, memory_sizes=(16 << 20, 1 << 20))
    try:
        hidden = fe.mem.regions.pop()  # negotiate() sends only the remaining region
        fe.negotiate(num_queues=1)
        fe.mem.regions.append(hidden)
        canary = os.urandom(4096)
        fe.mem.write(hidden.guest_addr, canary)
        assert fe.write(0, b"\x55" * 4096).status == OK
        st = status_byte(fe)
        fe.submit_raw(
            [
                Seg(header(fe, VirtioBlkRequestType.IN), 16),
                Seg(hidden.guest_addr, 4096, True),
                Seg(st, 1, True),
            ],
            status_addr=st,
        )
        assert fe.wait()[0].status == IOERR
        assert fe.mem.read(hidden.guest_addr, 4096) == canary
    finally:
        fe.close()


def test_ring_outside_guest_memory_needs_reset(served: Served) -> None:
    from harness.vhost.protocol import VhostUserU64, VhostVringAddr, VhostVringState

    fe = VhostUserFrontend(served.socket)
    try:
        fe.negotiate(num_queues=1)
        q = fe.queues[0]
        fe.stop_queue(q)
        fe.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, q.num))
        fe.request(
            VhostUserRequest.SET_VRING_ADDR, VhostVringAddr.pack(0, 0, 0x1000, 0x2000, 0x3000, 0)
        )
        fe.request(VhostUserRequest.SET_VRING_ERR, VhostUserU64.pack(0), [q.err_fd])
        assert fe.request(VhostUserRequest.SET_VRING_KICK, VhostUserU64.pack(0), [q.kick_fd]) == 0
        assert fe.err_signalled(0)
        assert needs_reset(fe)
        assert fe.get_u64(VhostUserRequest.GET_FEATURES)  # still talking
    finally:
        fe.close()


@pytest.mark.parametrize("request_type", ["SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"])
def test_a_vring_fd_that_is_not_an_eventfd_is_refused(
    fe: VhostUserFrontend, request_type: str
) -> None:
    from harness.vhost.protocol import VhostUserU64

    assert fe.write(0, b"e" * 512).status == OK
    q = fe.queues[0]
    base = fe.stop_queue(q)
    read_end, write_end = os.pipe()  # a read on a pipe would block the queue thread
    try:
        ack = fe.request(VhostUserRequest[request_type], VhostUserU64.pack(0), [read_end])
        assert ack not in (None, 0), "a pipe was accepted as a vring fd"
    finally:
        os.close(read_end)
        os.close(write_end)
    # Refused without harm: the ring restarts with real eventfds and serves I/O.
    q.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    q.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.start_queue(q, base=base)
    assert fe.read(0, 512).data == b"e" * 512
