"""Inflight I/O tracking: the shared region that lets a restarted backend resubmit.

Layout from vhost-user.rst "Inflight I/O tracking", split virtqueue: per
queue a `QueueRegionSplit` header (u64 features, u16 version, u16 desc_num,
u16 last_batch_head, u16 used_idx) followed by `desc_num` `DescStateSplit`
entries (u8 inflight, u8 padding[5], u16 next, u64 counter). Each queue's
part is sized as libvhost-user sizes it (16 bytes per descriptor plus two,
rounded up to 64) so the region stays compatible with other backends that
might be restarted on the same QEMU.

The backend (GET_INFLIGHT_FD) creates the region as a memfd; QEMU keeps it
and hands it back (SET_INFLIGHT_FD) to every later backend process, which is
how a request survives the process that popped it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass

from harness.errors import ProtocolError
from harness.vhost.memory import check_fd_covers

# vhost-user.rst QueueRegionSplit header.
QueueRegionSplit = struct.Struct("<QHHHH")
# vhost-user.rst DescStateSplit.
DescStateSplit = struct.Struct("<B5xHQ")
INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_OFF_VERSION = 8
_OFF_DESC_NUM = 10
_OFF_LAST_BATCH_HEAD = 12
_OFF_USED_IDX = 14


def queue_region_size(queue_size: int) -> int:
    raw = DescStateSplit.size * queue_size + 2
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


@dataclass(frozen=True)
class ResubmitEntry:
    head: int
    counter: int


class InflightQueue:
    """One queue's part of the region. Only that queue's thread writes it."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        needed = QueueRegionSplit.size + DescStateSplit.size * queue_size
        if len(view) < needed:
            raise ProtocolError(
                f"inflight region of {len(view)} bytes per queue is too small for "
                f"{queue_size} descriptors ({needed} needed)"
            )
        self.view = view
        self.queue_size = queue_size
        self.counter = 0
        # Hot-path fields through typed views: one store each, no struct round trip.
        self._u16 = view.cast("B").cast("H")
        self._u64 = view.cast("B").cast("Q")

    def close(self) -> None:
        for v in (self._u16, self._u64, self.view):
            v.release()

    def _desc_off(self, head: int) -> int:
        return QueueRegionSplit.size + head * DescStateSplit.size

    @property
    def version(self) -> int:
        return int(_U16.unpack_from(self.view, _OFF_VERSION)[0])

    @property
    def used_idx(self) -> int:
        return int(_U16.unpack_from(self.view, _OFF_USED_IDX)[0])

    def initialize(self) -> None:
        _U16.pack_into(self.view, _OFF_VERSION, INFLIGHT_VERSION)
        _U16.pack_into(self.view, _OFF_DESC_NUM, self.queue_size)

    def get(self, head: int) -> None:
        """A request was popped: mark it in flight with a submission counter."""
        off = QueueRegionSplit.size + head * DescStateSplit.size
        self._u64[(off + 8) >> 3] = self.counter
        self.counter += 1
        self.view[off] = 1

    def pre_put(self, head: int) -> None:
        """About to publish `head` in the used ring."""
        self._u16[_OFF_LAST_BATCH_HEAD >> 1] = head

    def post_put(self, head: int, used_idx: int) -> None:
        """`head` is in the used ring and used->idx is `used_idx`."""
        self.view[QueueRegionSplit.size + head * DescStateSplit.size] = 0
        self._u16[_OFF_USED_IDX >> 1] = used_idx

    def recover(self, ring_used_idx: int) -> list[ResubmitEntry]:
        """After a restart: the requests a dead backend popped but never completed.

        If the dead backend published a used entry but died before clearing
        its inflight flag, the used index in the ring is ahead of ours: that
        last batch head is done, not in flight.
        """
        if self.version == 0:
            self.initialize()
            return []
        if self.used_idx != ring_used_idx:
            last = int(_U16.unpack_from(self.view, _OFF_LAST_BATCH_HEAD)[0])
            if last < self.queue_size:
                _U8.pack_into(self.view, self._desc_off(last), 0)
            _U16.pack_into(self.view, _OFF_USED_IDX, ring_used_idx)
        entries = []
        for head in range(self.queue_size):
            off = self._desc_off(head)
            if _U8.unpack_from(self.view, off)[0] == 1:
                entries.append(ResubmitEntry(head, int(_U64.unpack_from(self.view, off + 8)[0])))
        entries.sort(key=lambda e: e.counter)
        self.counter = entries[-1].counter + 1 if entries else 0
        return entries


class InflightRegion:
    """The whole region: `num_queues` parts of `queue_region_size(queue_size)` each."""

    def __init__(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        if num_queues <= 0 or queue_size <= 0:
            raise ProtocolError(
                f"inflight region for {num_queues} queues of {queue_size} "
                "descriptors makes no sense"
            )
        per_queue = queue_region_size(queue_size)
        if mmap_size < per_queue * num_queues:
            raise ProtocolError(
                f"inflight region of {mmap_size} bytes is smaller than {num_queues} x "
                f"{per_queue} bytes"
            )
        check_fd_covers(fd, mmap_offset, mmap_size, "inflight region")
        try:
            self._map = mmap.mmap(
                fd,
                mmap_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=mmap_offset,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot map the inflight region: {exc}") from exc
        self.fd = fd
        self.mmap_size = mmap_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        view = memoryview(self._map)
        self.queues = [
            InflightQueue(view[i * per_queue : (i + 1) * per_queue], queue_size)
            for i in range(num_queues)
        ]

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightRegion:
        """A fresh zeroed region in a memfd (GET_INFLIGHT_FD)."""
        size = queue_region_size(queue_size) * num_queues
        fd = os.memfd_create("powercut-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        for q in self.queues:
            q.close()
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
