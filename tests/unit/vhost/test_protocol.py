"""Every vhost-user message the backend takes, through the in-process frontend."""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import PowercutError
from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.inflight import QueueRegionSplit, queue_region_size
from harness.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    Message,
    ProtocolFeature,
    VhostUserMsgHeader,
    VhostUserRequest,
    VhostUserU64,
    VhostVringState,
    recv_message,
    send_message,
)
from harness.vhost.server import SUPPORTED_PROTOCOL_FEATURES, listen_unix
from harness.vhost.virtio import (
    DeviceStatus,
    VirtioBlkFeature,
    VirtioBlkRequestType,
    VirtioBlkStatus,
    VirtioFeature,
)

from .conftest import IMAGE_SIZE, Served

OK = VirtioBlkStatus.OK


def test_features_offered(fe: VhostUserFrontend) -> None:
    offered = fe.get_u64(VhostUserRequest.GET_FEATURES)
    for bit in (
        VirtioFeature.VERSION_1,
        VirtioFeature.RING_INDIRECT_DESC,
        VirtioFeature.RING_EVENT_IDX,
        VHOST_USER_F_PROTOCOL_FEATURES,
        VirtioBlkFeature.FLUSH,
        VirtioBlkFeature.CONFIG_WCE,
        VirtioBlkFeature.MQ,
        VirtioBlkFeature.DISCARD,
        VirtioBlkFeature.WRITE_ZEROES,
        VirtioBlkFeature.SEG_MAX,
        VirtioBlkFeature.SIZE_MAX,
        VirtioBlkFeature.BLK_SIZE,
        VirtioBlkFeature.TOPOLOGY,
    ):
        assert offered & (1 << bit), bit
    assert not offered & (1 << VirtioBlkFeature.RO)
    assert not offered & (1 << VirtioFeature.RING_PACKED)


def test_protocol_features_offered(fe: VhostUserFrontend) -> None:
    pf = fe.get_u64(VhostUserRequest.GET_PROTOCOL_FEATURES)
    for bit in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.INFLIGHT_SHMFD,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ProtocolFeature.STATUS,
        ProtocolFeature.RESET_DEVICE,
    ):
        assert pf & (1 << bit), bit
    assert pf == SUPPORTED_PROTOCOL_FEATURES


def test_queue_num_and_mem_slots(fe: VhostUserFrontend) -> None:
    assert fe.get_u64(VhostUserRequest.GET_QUEUE_NUM) == 2
    assert fe.get_u64(VhostUserRequest.GET_MAX_MEM_SLOTS) >= 8


def test_config_space(fe: VhostUserFrontend) -> None:
    assert fe.config_field("capacity") == IMAGE_SIZE // 512
    assert fe.config_field("blk_size") == 512
    assert fe.config_field("num_queues") == 2
    assert fe.config_field("writeback") == 1
    assert fe.config_field("seg_max") >= 1
    assert fe.config_field("size_max") >= 4096
    assert fe.config_field("max_discard_sectors") > 0
    assert fe.config_field("max_write_zeroes_sectors") > 0
    assert fe.config_field("write_zeroes_may_unmap") == 1
    assert fe.get_config(0, 8) == struct.pack("<Q", IMAGE_SIZE // 512)
    # QEMU asks for exactly the size its feature set implies; the reply has that size.
    assert len(fe.get_config(0, 0x39)) == 0x39


@pytest.mark.parametrize(
    "cache,wce",
    [("writeback", 1), ("none", 1), ("unsafe", 1), ("writethrough", 0), ("directsync", 0)],
)
def test_wce_at_start_matches_the_cache_mode(
    serve: Callable[..., Served], cache: str, wce: int
) -> None:
    s = serve(cache=cache)
    with s.frontend() as fe:
        assert fe.config_field("writeback") == wce


def test_config_writes_other_than_wce_are_refused(
    served: Served, fe: VhostUserFrontend, caplog: pytest.LogCaptureFixture
) -> None:
    assert fe.set_config(0, b"\xff" * 8) == 1  # capacity
    assert fe.set_config(32, b"\x00\x00") == 1  # two bytes over wce
    assert fe.config_field("capacity") == IMAGE_SIZE // 512
    assert served.backend.enable_write_cache
    assert "refused" in caplog.text


def test_works_without_reply_ack(serve: Callable[..., Served]) -> None:
    s = serve()
    mask = SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.REPLY_ACK)
    with s.frontend(protocol_features=mask) as fe:
        assert not fe.reply_ack
        assert fe.write(0, b"r" * 512).status == OK
        assert fe.read(0, 512).data == b"r" * 512


def test_without_protocol_features_rings_start_enabled(serve: Callable[..., Served]) -> None:
    s = serve()
    mask = ((1 << 64) - 1) & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
    with VhostUserFrontend(s.socket) as fe:
        fe.negotiate(
            num_queues=1,
            features=mask,
            protocol_features=(1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.REPLY_ACK),
        )
        assert fe.write(0, b"e" * 512).status == OK


def test_set_mem_table_with_several_regions(serve: Callable[..., Served]) -> None:
    s = serve()
    fe = VhostUserFrontend(s.socket, memory_sizes=(4 << 20, 4 << 20, 8 << 20))
    try:
        fe.negotiate(num_queues=1, use_mem_slots=False)
        # Fill the first regions so buffers land in the last one.
        fe.mem.alloc(7 << 20)
        data = os.urandom(65536)
        assert fe.write(0, data).status == OK
        assert fe.read(0, 65536).data == data
        # A second SET_MEM_TABLE replaces the table while the ring runs.
        assert fe.set_mem_table() == 0
        assert fe.read(0, 65536).data == data
    finally:
        fe.close()


def test_set_mem_table_with_a_wrong_fd_count_is_refused(served: Served) -> None:
    from harness.vhost.protocol import VhostUserMemoryHeader, VhostUserMemoryRegion

    with VhostUserFrontend(served.socket) as fe:
        fe.negotiate(num_queues=1)
        r = fe.mem.regions[0]
        payload = VhostUserMemoryHeader.pack(2, 0) + VhostUserMemoryRegion.pack(*r.wire) * 2
        assert fe.request(VhostUserRequest.SET_MEM_TABLE, payload, [r.fd]) == 1
        assert fe.write(0, b"x" * 512).status == OK


def test_add_and_remove_memory_regions(serve: Callable[..., Served]) -> None:
    s = serve()
    fe = VhostUserFrontend(s.socket, memory_sizes=(8 << 20, 4 << 20))
    try:
        fe.negotiate(num_queues=1)
        second = fe.mem.regions[1]
        buf = second.guest_addr + 4096
        from harness.testing.vhost_frontend import Seg
        from harness.vhost.virtio import VirtioBlkOuthdr

        hdr = fe.mem.alloc(16)
        st = fe.mem.alloc(1)
        fe.mem.write(hdr, VirtioBlkOuthdr.pack(VirtioBlkRequestType.IN, 0, 0))
        fe.submit_raw([Seg(hdr, 16), Seg(buf, 512, True), Seg(st, 1, True)], status_addr=st)
        assert fe.wait()[0].status == OK
        assert fe.rem_mem_reg(second) == 0
        fe.submit_raw([Seg(hdr, 16), Seg(buf, 512, True), Seg(st, 1, True)], status_addr=st)
        assert fe.wait()[0].status == VirtioBlkStatus.IOERR
        assert fe.rem_mem_reg(second) == 1  # not there any more
        assert fe.add_mem_reg(second) == 0
        fe.submit_raw([Seg(hdr, 16), Seg(buf, 512, True), Seg(st, 1, True)], status_addr=st)
        assert fe.wait()[0].status == OK
        assert fe.add_mem_reg(second) == 1  # overlaps itself
    finally:
        fe.close()


def test_get_vring_base_stops_the_ring_and_a_restart_continues(fe: VhostUserFrontend) -> None:
    for i in range(5):
        assert fe.write(i * 8, bytes([i]) * 4096).status == OK
    q = fe.queues[0]
    assert fe.stop_queue(q) == 5
    # Stopped: a new request is not served.
    fe.submit(VirtioBlkRequestType.IN, 0, in_len=4096)
    time.sleep(0.3)
    assert q.used_idx() == 5
    # Restart from where it stopped (QEMU's SET_VRING_BASE), with fresh eventfds.
    q.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    q.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.start_queue(q, base=5)
    c = fe.wait()[0]
    assert c.status == OK and c.data == bytes([0]) * 4096


def test_vring_enable_zero_pauses_the_queue(fe: VhostUserFrontend) -> None:
    q = fe.queues[0]
    assert fe.request(VhostUserRequest.SET_VRING_ENABLE, VhostVringState.pack(0, 0)) == 0
    fe.submit(VirtioBlkRequestType.FLUSH)
    time.sleep(0.3)
    assert q.used_idx() == 0
    assert fe.request(VhostUserRequest.SET_VRING_ENABLE, VhostVringState.pack(0, 1)) == 0
    assert fe.wait()[0].status == OK


def test_status_is_stored_and_returned(fe: VhostUserFrontend) -> None:
    assert fe.get_u64(VhostUserRequest.GET_STATUS) == 0x0F
    fe.request(VhostUserRequest.SET_STATUS, VhostUserU64.pack(DeviceStatus.ACKNOWLEDGE))
    assert fe.get_u64(VhostUserRequest.GET_STATUS) == DeviceStatus.ACKNOWLEDGE


def test_reset_device_and_reset_owner(fe: VhostUserFrontend) -> None:
    fe.reset_device()
    assert fe.get_u64(VhostUserRequest.GET_STATUS) == 0
    assert fe.write(0, b"1" * 512).status == OK
    assert fe.request(VhostUserRequest.RESET_OWNER) == 0
    assert fe.get_u64(VhostUserRequest.GET_FEATURES)


@pytest.mark.parametrize(
    "request_code",
    [
        VhostUserRequest.SET_LOG_BASE,
        VhostUserRequest.SEND_RARP,
        VhostUserRequest.VRING_KICK,
        99,
        12345,
    ],
)
def test_unsupported_messages_are_nacked_and_the_connection_lives(
    fe: VhostUserFrontend, request_code: int
) -> None:
    assert fe.request(request_code, VhostUserU64.pack(0)) == 1
    assert fe.write(0, b"2" * 512).status == OK


@pytest.mark.parametrize("payload", [b"", b"\x01\x02"])
def test_truncated_payloads_are_nacked(fe: VhostUserFrontend, payload: bytes) -> None:
    for code in (
        VhostUserRequest.SET_FEATURES,
        VhostUserRequest.SET_VRING_NUM,
        VhostUserRequest.SET_VRING_ADDR,
        VhostUserRequest.SET_CONFIG,
        VhostUserRequest.ADD_MEM_REG,
        VhostUserRequest.SET_INFLIGHT_FD,
    ):
        assert fe.request(code, payload) == 1, code
    assert fe.write(0, b"3" * 512).status == OK


def test_bad_queue_index_and_size_are_nacked(fe: VhostUserFrontend) -> None:
    assert fe.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(7, 128)) == 1
    assert fe.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, 0)) == 1
    assert fe.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, 4096)) == 1
    assert fe.request(VhostUserRequest.SET_VRING_CALL, VhostUserU64.pack(9)) == 1
    assert fe.request(VhostUserRequest.SET_FEATURES, VhostUserU64.pack(1 << 63)) == 1


def test_oversized_message_drops_only_that_connection(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.socket))
        sock.sendall(
            VhostUserMsgHeader.pack(VhostUserRequest.SET_FEATURES, VHOST_USER_VERSION, 1 << 30)
        )
        sock.settimeout(10)
        assert sock.recv(1) == b""  # the backend hung up
    with served.frontend(num_queues=1) as fe:
        assert fe.write(0, b"4" * 512).status == OK


def test_reply_carries_the_reply_flag_and_version(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.socket))
        send_message(sock, Message(VhostUserRequest.GET_FEATURES))
        reply = recv_message(sock)
        assert reply.flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
        # NEED_REPLY on a message that has its own reply: one reply, not two.
        send_message(
            sock,
            Message(
                VhostUserRequest.GET_QUEUE_NUM, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
            ),
        )
        assert recv_message(sock).u64() == 2
        send_message(sock, Message(VhostUserRequest.GET_STATUS))
        assert recv_message(sock).request == VhostUserRequest.GET_STATUS


def test_inflight_region_layout(fe: VhostUserFrontend) -> None:
    import mmap

    assert fe.inflight_size == 2 * queue_region_size(128)
    fe.write(0, b"5" * 512)
    m = mmap.mmap(fe.inflight_fd, fe.inflight_size)
    try:
        _features, version, desc_num, _last, used_idx = QueueRegionSplit.unpack_from(m, 0)
        assert (version, desc_num, used_idx) == (1, 128, 1)
        # Nothing is left marked in flight once completed.
        assert all(m[QueueRegionSplit.size + 16 * i] == 0 for i in range(128))
    finally:
        m.close()


def test_resubmits_requests_a_dead_backend_left_in_flight(
    served: Served, fe: VhostUserFrontend
) -> None:
    """What a restarted backend finds: entries marked in flight that never completed."""
    import mmap

    assert fe.write(0, b"a" * 512).status == OK
    q = fe.queues[0]
    fe.stop_queue(q)
    # Three requests made available; pretend a backend popped the first two and died.
    heads = [
        fe.submit(VirtioBlkRequestType.OUT, 8 * (i + 1), data=bytes([0x30 + i]) * 512)
        for i in range(3)
    ]
    m = mmap.mmap(fe.inflight_fd, fe.inflight_size)
    try:
        for counter, head in enumerate(heads[:2]):
            off = QueueRegionSplit.size + 16 * head
            struct.pack_into("<B5xHQ", m, off, 1, 0, 100 + counter)
    finally:
        m.close()
    fe.sock.close()  # the frontend notices the dead backend ...
    deadline = time.monotonic() + 10
    while served.server.session is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    q.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    q.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.queues[1].kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.queues[1].call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.reconnect()  # ... and reconnects with SET_VRING_BASE = used index
    done = fe.wait(0, 3)
    assert sorted(c.head for c in done) == sorted(heads)
    assert all(c.status == OK for c in done)
    for i in range(3):
        assert fe.read(8 * (i + 1), 512).data == bytes([0x30 + i]) * 512


def test_frontend_gone_mid_io_then_the_next_one_is_served(served: Served) -> None:
    fe = served.frontend(num_queues=2)
    for i in range(30):
        fe.submit(VirtioBlkRequestType.OUT, 8 * i, data=bytes([i]) * 4096, queue=i % 2)
    fe.close()  # QEMU killed: no GET_VRING_BASE, no goodbye
    with served.frontend(num_queues=2) as fe2:
        assert fe2.write(0, b"n" * 4096).status == OK
        assert fe2.read(0, 4096).data == b"n" * 4096
    assert served.server.connections == 2


def test_socket_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "s.sock"
    sock = listen_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        sock.close()


def test_stale_socket_is_replaced_but_a_live_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = listen_unix(path)
    with pytest.raises(PowercutError, match="in use"):
        listen_unix(path)
    first.close()  # the file stays, nobody listens: stale
    second = listen_unix(path)
    second.close()
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(PowercutError, match="not a socket"):
        listen_unix(other)
