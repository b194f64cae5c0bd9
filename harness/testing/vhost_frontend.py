"""An in-process vhost-user-blk frontend: QEMU's side of the socket, in Python.

It owns "guest memory" (memfds it shares with the backend, at guest-physical
and frontend-virtual addresses of its choosing), drives the negotiation the
way QEMU 7.2's vhost-user-blk-pci does, lays out split rings, and submits
virtio-blk requests — well-formed ones through `read`/`write`/... and any
malformed chain through `submit_raw`. Tests use it to reach every message
and every request path without a VM; benchmarks use it to drive this
backend and qemu-storage-daemon with the same request stream.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.errors import ProtocolError, TimeoutExpired
from harness.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    Message,
    ProtocolFeature,
    VhostUserConfigHeader,
    VhostUserInflight,
    VhostUserMemoryHeader,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostUserRequest,
    VhostUserU64,
    VhostVringAddr,
    VhostVringState,
    recv_message,
    send_message,
)
from harness.vhost.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtioBlkConfig,
    VirtioBlkDiscardWriteZeroes,
    VirtioBlkOuthdr,
    VirtioBlkRequestType,
    VirtioBlkStatus,
    VirtioFeature,
    VirtqDesc,
    VirtqUsedElem,
    memory_barrier,
    ring_u16,
    split_ring_sizes,
    vring_need_event,
)

CONFIG_SIZE_QEMU72 = 60
GUEST_BASE = 0x100000  # guest-physical address of the first region
USER_BASE = 0x7F0000000000  # "frontend virtual" address of the first region
_EVENT = struct.Struct("<Q")


@dataclass
class GuestRegion:
    fd: int
    map: mmap.mmap
    guest_addr: int
    user_addr: int
    size: int

    @property
    def wire(self) -> tuple[int, int, int, int]:
        return (self.guest_addr, self.size, self.user_addr, 0)


@dataclass(frozen=True)
class Seg:
    """One descriptor of a chain: guest address, length, device-writable?"""

    addr: int
    length: int
    write: bool = False


@dataclass
class Completion:
    head: int
    length: int
    status: int | None
    data: bytes = b""


@dataclass
class _Pending:
    descs: list[int]
    status_addr: int | None
    in_addr: int | None = None
    in_len: int = 0
    buffers: list[tuple[int, int]] = field(default_factory=list)  # allocations to free


class FrontendMemory:
    """The frontend's side of guest RAM: shared memfd regions plus a first-fit allocator.

    (The backend maps the same regions through `harness.vhost.memory.GuestMemory`.)
    """

    def __init__(self, sizes: Sequence[int] = (64 << 20,), gap: int = 1 << 20) -> None:
        self.regions: list[GuestRegion] = []
        gpa, uva = GUEST_BASE, USER_BASE
        for size in sizes:
            fd = os.memfd_create("powercut-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            self.regions.append(GuestRegion(fd, m, gpa, uva, size))
            gpa += size + gap
            uva += size + gap
        self._free: list[tuple[int, int]] = [(r.guest_addr, r.size) for r in self.regions]
        self._lock = threading.Lock()  # one thread per queue may allocate

    def close(self) -> None:
        for region in self.regions:
            # A benchmark stream may still hold views; the mapping then goes with them.
            with contextlib.suppress(BufferError):
                region.map.close()
            os.close(region.fd)
        self.regions.clear()

    def alloc(self, size: int, align: int = 64) -> int:
        with self._lock:
            return self._alloc(size, align)

    def _alloc(self, size: int, align: int) -> int:
        size = max(size, 1)
        for i, (start, length) in enumerate(self._free):
            aligned = (start + align - 1) // align * align
            pad = aligned - start
            if length >= size + pad:
                rest = [(start, pad)] if pad else []
                if length > size + pad:
                    rest.append((aligned + size, length - size - pad))
                self._free[i : i + 1] = rest
                return aligned
        raise ProtocolError(f"test guest memory exhausted (wanted {size} bytes)")

    def free(self, addr: int, size: int) -> None:
        with self._lock:
            self._free_locked(addr, size)

    def _free_locked(self, addr: int, size: int) -> None:
        self._free.append((addr, max(size, 1)))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged

    def _find(self, gpa: int, length: int) -> tuple[GuestRegion, int]:
        for region in self.regions:
            if region.guest_addr <= gpa and gpa + length <= region.guest_addr + region.size:
                return region, gpa - region.guest_addr
        raise ProtocolError(f"test frontend: 0x{gpa:x}+{length} is not in guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        region, off = self._find(gpa, length)
        return memoryview(region.map)[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._find(gpa, length)
        return region.map[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        region, off = self._find(gpa, len(data))
        region.map[off : off + len(data)] = data

    def uva(self, gpa: int) -> int:
        region, off = self._find(gpa, 1)
        return region.user_addr + off


class DriverQueue:
    """The driver side of one split ring in test guest memory."""

    def __init__(self, mem: FrontendMemory, index: int, num: int, event_idx: bool) -> None:
        self.mem = mem
        self.index = index
        self.num = num
        self.event_idx = event_idx
        desc_size, avail_size, used_size = split_ring_sizes(num)
        self.desc_addr = mem.alloc(desc_size, 16)
        self.avail_addr = mem.alloc(avail_size, 2)
        self.used_addr = mem.alloc(used_size, 4)
        for addr, size in (
            (self.desc_addr, desc_size),
            (self.avail_addr, avail_size),
            (self.used_addr, used_size),
        ):
            mem.write(addr, bytes(size))
        # Indices and events are shared with a running device: one 16-bit access each.
        self.avail16 = ring_u16(mem.view(self.avail_addr, avail_size))
        self.used16 = ring_u16(mem.view(self.used_addr, used_size))
        self.free_descs = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pending: dict[int, _Pending] = {}
        self.kicks = 0

    def close(self) -> None:
        self.avail16.release()
        self.used16.release()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc_addr + 16 * i, VirtqDesc.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.avail16[2 + self.avail_idx % self.num] = head
        old = self.avail_idx
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail16[1] = self.avail_idx
        memory_barrier()  # publish the index, then read the device's event (virtio 2.7.13)
        self.kick(old)

    def kick(self, old: int | None = None) -> None:
        if old is not None:
            if self.event_idx:
                if not vring_need_event(self.used16[2 + 4 * self.num], self.avail_idx, old):
                    return
            elif self.used16[0] & VIRTQ_USED_F_NO_NOTIFY:
                return
        self.kicks += 1
        os.write(self.kick_fd, _EVENT.pack(1))

    def used_idx(self) -> int:
        return int(self.used16[1])

    def reap(self) -> list[tuple[int, int]]:
        """(head, len) of every entry the device added since the last reap."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used_addr + 4 + 8 * (self.last_used % self.num)
            out.append(VirtqUsedElem.unpack(self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.avail16[2 + self.num] = self.last_used
            memory_barrier()  # the next used->idx read must not pass this store
        return out


class VhostUserFrontend:
    """Connects to a vhost-user-blk backend socket and drives it like QEMU."""

    def __init__(
        self,
        path: str | Path,
        *,
        memory_sizes: Sequence[int] = (64 << 20,),
        connect_timeout: float = 10.0,
    ) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise TimeoutExpired(
                        f"no vhost-user backend listening on {self.path} after {connect_timeout}s"
                    ) from None
                time.sleep(0.02)
        self.mem = FrontendMemory(memory_sizes)
        self.queues: list[DriverQueue] = []
        self.features = 0
        self.protocol_features = 0
        self.config = b""
        self.inflight_fd = -1
        self.inflight_size = 0
        self.reply_ack = False

    # -- messages --------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> None:
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        send_message(self.sock, Message(request, flags, payload, list(fds)))

    def recv(self, request: int, timeout: float = 30.0) -> Message:
        self.sock.settimeout(timeout)
        try:
            msg = recv_message(self.sock)
        finally:
            self.sock.settimeout(None)
        if msg.request != request or not msg.flags & VHOST_USER_REPLY_MASK:
            msg.close_fds()
            raise ProtocolError(
                f"expected a reply to {VhostUserRequest(request).name}, got "
                f"{msg.name} flags 0x{msg.flags:x}"
            )
        return msg

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """A message with its own reply (GET_*)."""
        self.send(request, payload, fds)
        return self.recv(request)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int | None:
        """A message without its own reply: acked (0 = success) when REPLY_ACK is on."""
        self.send(request, payload, fds, need_reply=self.reply_ack)
        if not self.reply_ack:
            return None
        return self.recv(request).u64()

    def get_u64(self, request: int) -> int:
        return self.call(request).u64()

    # -- the negotiation QEMU does ----------------------------------------------

    def negotiate(
        self,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        features: int | None = None,
        protocol_features: int | None = None,
        use_mem_slots: bool = True,
        inflight: bool = True,
        status: bool = True,
    ) -> None:
        offered = self.get_u64(VhostUserRequest.GET_FEATURES)
        if not offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            raise ProtocolError("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        pf = self.get_u64(VhostUserRequest.GET_PROTOCOL_FEATURES)
        want_pf = pf if protocol_features is None else pf & protocol_features
        self.protocol_features = want_pf
        self.request(VhostUserRequest.SET_PROTOCOL_FEATURES, VhostUserU64.pack(want_pf))
        self.reply_ack = bool(want_pf & (1 << ProtocolFeature.REPLY_ACK))
        if want_pf & (1 << ProtocolFeature.MQ):
            backend_queues = self.get_u64(VhostUserRequest.GET_QUEUE_NUM)
            if backend_queues < num_queues:
                raise ProtocolError(f"backend has {backend_queues} queues, {num_queues} wanted")
        if want_pf & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self.get_u64(VhostUserRequest.GET_MAX_MEM_SLOTS)
        self.request(VhostUserRequest.SET_OWNER)
        # QEMU 7.2 asks for at most the 60 bytes before the secure-erase fields.
        self.config = self.get_config(0, CONFIG_SIZE_QEMU72)
        if inflight and want_pf & (1 << ProtocolFeature.INFLIGHT_SHMFD):
            self.get_inflight(num_queues, queue_size)
            self.set_inflight()
        want = offered if features is None else offered & features
        self.features = want
        self.request(VhostUserRequest.SET_FEATURES, VhostUserU64.pack(want))
        slots = use_mem_slots and want_pf & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if slots:
            for region in self.mem.regions:
                self.add_mem_reg(region)
        else:
            self.set_mem_table()
        event_idx = bool(want & (1 << VirtioFeature.RING_EVENT_IDX))
        if not self.queues:
            self.queues = [
                DriverQueue(self.mem, i, queue_size, event_idx) for i in range(num_queues)
            ]
        for q in self.queues:
            self.start_queue(q)
        if status and want_pf & (1 << ProtocolFeature.STATUS):
            self.request(VhostUserRequest.SET_STATUS, VhostUserU64.pack(0x0F))

    def reconnect(self, path: str | Path | None = None, timeout: float = 30.0) -> None:
        """A new connection after the backend died, as QEMU's `reconnect` does.

        Memory, rings and the inflight region stay; the new backend gets them
        again, as QEMU hands them to a restarted daemon.
        """
        with contextlib.suppress(OSError):
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path or self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutExpired(f"backend did not come back on {self.path}") from None
                time.sleep(0.02)
        num_queues = len(self.queues)
        offered = self.get_u64(VhostUserRequest.GET_FEATURES)
        pf = self.get_u64(VhostUserRequest.GET_PROTOCOL_FEATURES) & self.protocol_features
        self.request(VhostUserRequest.SET_PROTOCOL_FEATURES, VhostUserU64.pack(pf))
        if pf & (1 << ProtocolFeature.MQ):
            self.get_u64(VhostUserRequest.GET_QUEUE_NUM)
        self.request(VhostUserRequest.SET_OWNER)
        if self.inflight_fd >= 0:
            self.set_inflight(num_queues)
        self.request(VhostUserRequest.SET_FEATURES, VhostUserU64.pack(self.features & offered))
        if pf & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS):
            for region in self.mem.regions:
                self.add_mem_reg(region)
        else:
            self.set_mem_table()
        for q in self.queues:
            # QEMU could not ask the dead backend, so it restarts from the used index.
            self.start_queue(q, base=q.used_idx())

    def reset_device(self) -> None:
        """VHOST_USER_RESET_DEVICE, then fresh rings, as after a guest driver reset."""
        self.request(VhostUserRequest.RESET_DEVICE)
        event_idx = bool(self.features & (1 << VirtioFeature.RING_EVENT_IDX))
        old = self.queues
        self.queues = [DriverQueue(self.mem, q.index, q.num, event_idx) for q in old]
        for q in old:
            q.close()
        if self.inflight_fd >= 0:
            self.get_inflight(len(self.queues), self.inflight_queue_size)
            self.set_inflight()
        self.request(VhostUserRequest.SET_FEATURES, VhostUserU64.pack(self.features))
        for q in self.queues:
            self.start_queue(q)

    def start_queue(self, q: DriverQueue, base: int | None = None) -> None:
        self.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(q.index, q.num))
        self.request(
            VhostUserRequest.SET_VRING_BASE,
            VhostVringState.pack(q.index, q.avail_idx if base is None else base),
        )
        self.request(
            VhostUserRequest.SET_VRING_ADDR,
            VhostVringAddr.pack(
                q.index,
                0,
                self.mem.uva(q.desc_addr),
                self.mem.uva(q.used_addr),
                self.mem.uva(q.avail_addr),
                0,
            ),
        )
        self.request(VhostUserRequest.SET_VRING_KICK, VhostUserU64.pack(q.index), [q.kick_fd])
        self.request(VhostUserRequest.SET_VRING_CALL, VhostUserU64.pack(q.index), [q.call_fd])
        self.request(VhostUserRequest.SET_VRING_ERR, VhostUserU64.pack(q.index), [q.err_fd])
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.request(VhostUserRequest.SET_VRING_ENABLE, VhostVringState.pack(q.index, 1))

    def stop_queue(self, q: DriverQueue) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where it got to."""
        reply = self.call(VhostUserRequest.GET_VRING_BASE, VhostVringState.pack(q.index, 0))
        _index, base = VhostVringState.unpack(reply.payload[:8])
        return int(base)

    def set_mem_table(self, regions: Sequence[GuestRegion] | None = None) -> int | None:
        regions = list(self.mem.regions if regions is None else regions)
        payload = VhostUserMemoryHeader.pack(len(regions), 0) + b"".join(
            VhostUserMemoryRegion.pack(*r.wire) for r in regions
        )
        return self.request(VhostUserRequest.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def add_mem_reg(self, region: GuestRegion) -> int | None:
        return self.request(
            VhostUserRequest.ADD_MEM_REG, VhostUserMemRegMsg.pack(0, *region.wire), [region.fd]
        )

    def rem_mem_reg(self, region: GuestRegion) -> int | None:
        return self.request(
            VhostUserRequest.REM_MEM_REG, VhostUserMemRegMsg.pack(0, *region.wire), [region.fd]
        )

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.call(
            VhostUserRequest.GET_CONFIG, VhostUserConfigHeader.pack(offset, size, 0) + bytes(size)
        )
        return reply.payload[VhostUserConfigHeader.size :]

    def set_config(self, offset: int, data: bytes) -> int | None:
        return self.request(
            VhostUserRequest.SET_CONFIG, VhostUserConfigHeader.pack(offset, len(data), 0) + data
        )

    def get_inflight(self, num_queues: int, queue_size: int) -> None:
        reply = self.call(
            VhostUserRequest.GET_INFLIGHT_FD, VhostUserInflight.pack(0, 0, num_queues, queue_size)
        )
        size, _offset, _, _ = VhostUserInflight.unpack(reply.payload[: VhostUserInflight.size])
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
        self.inflight_fd = reply.take_fd()
        self.inflight_size = size
        self.inflight_queue_size = queue_size

    def set_inflight(self, num_queues: int | None = None) -> None:
        n = num_queues if num_queues is not None else max(1, len(self.queues))
        self.request(
            VhostUserRequest.SET_INFLIGHT_FD,
            VhostUserInflight.pack(self.inflight_size, 0, n, self.inflight_queue_size),
            [self.inflight_fd],
        )

    def config_field(self, name: str) -> int:
        fields = VirtioBlkConfig.unpack(self.config.ljust(VirtioBlkConfig.size, b"\0"))
        names = [
            "capacity",
            "size_max",
            "seg_max",
            "cylinders",
            "heads",
            "sectors",
            "blk_size",
            "physical_block_exp",
            "alignment_offset",
            "min_io_size",
            "opt_io_size",
            "writeback",
            "unused0",
            "num_queues",
            "max_discard_sectors",
            "max_discard_seg",
            "discard_sector_alignment",
            "max_write_zeroes_sectors",
            "max_write_zeroes_seg",
            "write_zeroes_may_unmap",
            "max_secure_erase_sectors",
            "max_secure_erase_seg",
            "secure_erase_sector_alignment",
        ]
        return int(fields[names.index(name)])

    # -- requests ----------------------------------------------------------------

    def submit_raw(
        self,
        segs: Sequence[Seg],
        *,
        queue: int = 0,
        indirect: bool = False,
        status_addr: int | None = None,
        in_addr: int | None = None,
        in_len: int = 0,
    ) -> int:
        """Publish a chain made of exactly these descriptors; returns its head."""
        q = self.queues[queue]
        if indirect:
            table = self.mem.alloc(16 * len(segs), 16)
            for i, s in enumerate(segs):
                flags = (VIRTQ_DESC_F_WRITE if s.write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(segs) else 0
                )
                self.mem.write(table + 16 * i, VirtqDesc.pack(s.addr, s.length, flags, i + 1))
            head = q.free_descs.pop(0)
            q.write_desc(head, table, 16 * len(segs), VIRTQ_DESC_F_INDIRECT, 0)
            descs = [head]
            buffers = [(table, 16 * len(segs))]
        else:
            if len(q.free_descs) < len(segs):
                raise ProtocolError("test frontend: ring full")
            descs = [q.free_descs.pop(0) for _ in segs]
            for i, s in enumerate(segs):
                last = i + 1 == len(segs)
                flags = (VIRTQ_DESC_F_WRITE if s.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                q.write_desc(descs[i], s.addr, s.length, flags, 0 if last else descs[i + 1])
            buffers = []
        q.pending[descs[0]] = _Pending(descs, status_addr, in_addr, in_len, buffers)
        q.publish(descs[0])
        return descs[0]

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        *,
        data: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        indirect: bool = False,
        split: int = 0,
    ) -> int:
        """A well-formed request: header, data (split in `split`-byte descriptors), status."""
        hdr_addr = self.mem.alloc(16 + len(data))
        self.mem.write(hdr_addr, VirtioBlkOuthdr.pack(rtype, 0, sector) + data)
        segs = [Seg(hdr_addr, 16)]
        segs += _chunks(hdr_addr + 16, len(data), split, False)
        in_addr = self.mem.alloc(in_len + 1)
        segs += _chunks(in_addr, in_len, split, True)
        segs.append(Seg(in_addr + in_len, 1, True))
        self.mem.write(in_addr + in_len, b"\xff")
        head = self.submit_raw(
            segs,
            queue=queue,
            indirect=indirect,
            status_addr=in_addr + in_len,
            in_addr=in_addr,
            in_len=in_len,
        )
        self.queues[queue].pending[head].buffers += [
            (hdr_addr, 16 + len(data)),
            (in_addr, in_len + 1),
        ]
        return head

    def wait(self, queue: int = 0, count: int = 1, timeout: float = 30.0) -> list[Completion]:
        """Wait for `count` completions on `queue` (call eventfd, then the used ring)."""
        q = self.queues[queue]
        done: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(done) < count:
            for head, length in q.reap():
                done.append(self._complete(q, head, length))
            if len(done) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutExpired(
                    f"queue {queue}: {len(done)} of {count} requests completed in {timeout}s"
                )
            r, _, _ = select.select([q.call_fd], [], [], min(left, 0.5))
            if r:
                with contextlib.suppress(BlockingIOError):
                    os.read(q.call_fd, 8)
        return done

    def _complete(self, q: DriverQueue, head: int, length: int) -> Completion:
        pending = q.pending.pop(head, None)
        if pending is None:
            raise ProtocolError(
                f"queue {q.index}: device completed head {head}, which was not in flight"
            )
        status = None
        data = b""
        if pending.status_addr is not None:
            status = self.mem.read(pending.status_addr, 1)[0]
        if pending.in_addr is not None and pending.in_len:
            data = self.mem.read(pending.in_addr, pending.in_len)
        q.free_descs.extend(pending.descs)
        for addr, size in pending.buffers:
            self.mem.free(addr, size)
        return Completion(head, length, status, data)

    def run(self, rtype: int, sector: int = 0, **kwargs: object) -> Completion:
        queue = int(kwargs.get("queue", 0))  # type: ignore[call-overload]
        self.submit(rtype, sector, **kwargs)  # type: ignore[arg-type]
        return self.wait(queue)[0]

    def read(self, sector: int, length: int, **kwargs: object) -> Completion:
        return self.run(VirtioBlkRequestType.IN, sector, in_len=length, **kwargs)

    def write(self, sector: int, data: bytes, **kwargs: object) -> Completion:
        return self.run(VirtioBlkRequestType.OUT, sector, data=data, **kwargs)

    def flush(self, **kwargs: object) -> Completion:
        return self.run(VirtioBlkRequestType.FLUSH, 0, **kwargs)

    def get_id(self, **kwargs: object) -> Completion:
        return self.run(VirtioBlkRequestType.GET_ID, 0, in_len=20, **kwargs)

    def discard(self, sector: int, num: int, flags: int = 0, **kwargs: object) -> Completion:
        seg = VirtioBlkDiscardWriteZeroes.pack(sector, num, flags)
        return self.run(VirtioBlkRequestType.DISCARD, 0, data=seg, **kwargs)

    def write_zeroes(
        self, sector: int, num: int, unmap: bool = False, **kwargs: object
    ) -> Completion:
        seg = VirtioBlkDiscardWriteZeroes.pack(sector, num, 1 if unmap else 0)
        return self.run(VirtioBlkRequestType.WRITE_ZEROES, 0, data=seg, **kwargs)

    def status_ok(self, c: Completion) -> bool:
        return c.status == VirtioBlkStatus.OK

    def err_signalled(self, queue: int = 0, timeout: float = 5.0) -> bool:
        r, _, _ = select.select([self.queues[queue].err_fd], [], [], timeout)
        return bool(r)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for q in self.queues:
            q.close()
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
            self.inflight_fd = -1
        self.mem.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _chunks(addr: int, length: int, split: int, write: bool) -> Iterator[Seg]:
    if length <= 0:
        return
    step = split or length
    for off in range(0, length, step):
        yield Seg(addr + off, min(step, length - off), write)


# Not used by the frontend itself, exported for tests that build hostile chains.
NOFD = VHOST_USER_VRING_NOFD_MASK


class RequestStream:
    """A fixed-depth request loop over preallocated slots: the benchmark driver.

    Every slot owns a header, a data buffer and a status byte and three
    chained descriptors, so a request costs one header write, one avail
    entry and (unless EVENT_IDX suppresses it) one kick; the same stream
    drives any vhost-user-blk backend, which makes the comparison about the
    backends.
    """

    def __init__(self, fe: VhostUserFrontend, *, depth: int, block: int, queue: int = 0) -> None:
        q = fe.queues[queue]
        if 3 * depth > q.num:
            raise ProtocolError(
                f"depth {depth} needs {3 * depth} descriptors; the ring has {q.num}"
            )
        self.fe = fe
        self.q = q
        self.depth = depth
        self.block = block
        self.slots: list[tuple[int, int, int]] = []  # header, data, status addresses
        self.descs: list[int] = []
        for _ in range(depth):
            hdr = fe.mem.alloc(16)
            data = fe.mem.alloc(block, 4096)
            status = fe.mem.alloc(1)
            self.slots.append((hdr, data, status))
            self.descs += [q.free_descs.pop(0) for _ in range(3)]
        self._hdr_views = [fe.mem.view(s[0], 16) for s in self.slots]
        self._head_slot = {self.descs[3 * i]: i for i in range(depth)}
        self.errors = 0

    def _chain(self, slot: int, write: bool) -> int:
        hdr, data, status = self.slots[slot]
        d0, d1, d2 = self.descs[3 * slot : 3 * slot + 3]
        q = self.q
        q.write_desc(d0, hdr, 16, VIRTQ_DESC_F_NEXT, d1)
        q.write_desc(
            d1, data, self.block, VIRTQ_DESC_F_NEXT | (0 if write else VIRTQ_DESC_F_WRITE), d2
        )
        q.write_desc(d2, status, 1, VIRTQ_DESC_F_WRITE, 0)
        return d0

    def run(self, offsets: Sequence[int], write: bool) -> float:
        """Issue one request per offset, `depth` at a time; returns the seconds taken."""
        q = self.q
        rtype = VirtioBlkRequestType.OUT if write else VirtioBlkRequestType.IN
        heads = [self._chain(i, write) for i in range(self.depth)]
        mem = self.fe.mem
        status_views = [mem.view(s[2], 1) for s in self.slots]
        pack = VirtioBlkOuthdr.pack_into
        total = len(offsets)
        issued = done = 0
        start = time.perf_counter()
        for slot in range(min(self.depth, total)):
            pack(self._hdr_views[slot], 0, rtype, 0, offsets[issued] >> 9)
            q.publish(heads[slot])
            issued += 1
        poller = select.poll()
        poller.register(q.call_fd, select.POLLIN)
        while done < total:
            completed = q.reap()
            if not completed:
                if not poller.poll(30000):
                    raise TimeoutExpired(f"no completion in 30s ({done}/{total} done)")
                with contextlib.suppress(BlockingIOError):
                    os.read(q.call_fd, 8)
                continue
            for head, _length in completed:
                slot = self._head_slot[head]
                if status_views[slot][0] != VirtioBlkStatus.OK:
                    self.errors += 1
                done += 1
                if issued < total:
                    pack(self._hdr_views[slot], 0, rtype, 0, offsets[issued] >> 9)
                    q.publish(head)
                    issued += 1
        return time.perf_counter() - start
