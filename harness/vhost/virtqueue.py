"""The split virtqueue (virtio 1.2 section 2.7), device side.

The ring lives in guest memory that the guest may change at any moment, so
every value read from it is validated before use: head indices, `next`
links, chain length, indirect tables (section 2.7.5.3), and each buffer
address against the memory table. A chain that cannot be walked is a broken
ring: there is no status byte one could trust, so the queue stops and the
device reports DEVICE_NEEDS_RESET (as QEMU's virtqueue_pop does with
virtio_error).

Walking a chain only collects (address, length) pairs; turning them into
memoryviews — and so any failure of a data buffer — belongs to the request,
which can still report IOERR through a good status byte.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from harness.errors import GuestError
from harness.vhost.inflight import InflightQueue, ResubmitEntry
from harness.vhost.memory import GuestMemory
from harness.vhost.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqDesc,
    VirtqUsedElem,
    memory_barrier,
    ring_u16,
    split_ring_sizes,
    vring_need_event,
)

log = logging.getLogger(__name__)

_EVENT = struct.Struct("<Q")


class BrokenRing(GuestError):
    """The ring itself is malformed; no status can be written for this chain."""


# Buffer and DescChain are values made once per request on the hot path; named
# tuples cost a fraction of a frozen dataclass's __init__.
class Buffer(NamedTuple):
    """One descriptor's buffer: guest-physical address and length."""

    addr: int
    length: int


class DescChain(NamedTuple):
    """A popped request: its head index and the buffers the guest gave."""

    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]
    # A layout fault (readable after writable): the request fails with IOERR if the
    # last descriptor is still a writable one to put the status in.
    fault: str | None = None
    last_writable: bool = True

    @property
    def nbytes(self) -> int:
        return sum(b.length for b in self.readable) + sum(b.length for b in self.writable)


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR, frontend-virtual addresses."""

    flags: int
    desc: int
    used: int
    avail: int
    log: int


class SplitVirtqueue:
    """One queue's state on the device side. Used by exactly one thread once started."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: VringAddr | None = None
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = True
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.enabled: bool | None = None  # None: never told (rings without protocol features)
        self.broken = False
        self.inflight: InflightQueue | None = None
        self._resubmit: list[ResubmitEntry] = []
        self._signalled_used = 0
        self._signalled_valid = False
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        # The same rings as arrays of u16: index, flag and event fields are read and
        # written through these, one 16-bit access each (see virtio.ring_u16).
        self._avail16: memoryview | None = None
        self._used16: memoryview | None = None
        self.completed = 0

    # -- setup ---------------------------------------------------------------

    def map(self, memory: GuestMemory) -> None:
        """Resolve the ring addresses to views of guest memory."""
        if self.addr is None or self.num == 0:
            raise GuestError(f"queue {self.index} started without SET_VRING_NUM/SET_VRING_ADDR")
        desc_size, avail_size, used_size = split_ring_sizes(self.num)
        self._desc = memory.uva_contiguous(self.addr.desc, desc_size)
        self._avail = memory.uva_contiguous(self.addr.avail, avail_size)
        self._used = memory.uva_contiguous(self.addr.used, used_size)
        self._avail16 = ring_u16(self._avail)
        self._used16 = ring_u16(self._used)
        self._signalled_valid = False

    def unmap(self) -> None:
        for view in (self._avail16, self._used16, self._desc, self._avail, self._used):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = self._avail16 = self._used16 = None

    @property
    def mapped(self) -> bool:
        return self._used is not None

    def ring_used_idx(self) -> int:
        assert self._used16 is not None
        return int(self._used16[1])

    def avail_idx(self) -> int:
        assert self._avail16 is not None
        return int(self._avail16[1])

    def recover_inflight(self) -> int:
        """Rebuild state after a backend restart; returns how many requests to resubmit."""
        if self.inflight is None:
            return 0
        fresh = self.inflight.version == 0
        self.used_idx = self.ring_used_idx()
        self._resubmit = self.inflight.recover(self.used_idx)
        if not fresh:
            # Everything the guest made available up to the used index plus what was
            # in flight has been taken; the rest is new.
            self.last_avail_idx = (self.used_idx + len(self._resubmit)) & 0xFFFF
        return len(self._resubmit)

    # -- notifications -------------------------------------------------------

    def disable_notification(self) -> None:
        if not self.event_idx and self._used16 is not None:
            self._used16[0] |= VIRTQ_USED_F_NO_NOTIFY

    def enable_notification(self) -> None:
        """Ask for a kick on the next new request; the caller must re-check afterwards."""
        assert self._used16 is not None
        if self.event_idx:
            self._used16[2 + 4 * self.num] = self.last_avail_idx
        else:
            self._used16[0] &= ~VIRTQ_USED_F_NO_NOTIFY & 0xFFFF
        # The guest stores its index, then reads our event (virtio 2.7.10); we store
        # our event, then read its index. Without a fence both could read stale values
        # and each wait for the other.
        memory_barrier()

    def has_available(self) -> bool:
        return bool(self._resubmit) or self.avail_idx() != self.last_avail_idx

    def _should_notify(self) -> bool:
        assert self._avail16 is not None
        memory_barrier()  # used->idx is stored; now read what the driver asked for
        if not self.event_idx:
            return not (self._avail16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
        old, new = self._signalled_used, self.used_idx
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        used_event = self._avail16[2 + self.num]
        return not valid or vring_need_event(used_event, new, old)

    def notify(self) -> None:
        if self.call_fd >= 0 and self._should_notify():
            signal_eventfd(self.call_fd)

    # -- requests ------------------------------------------------------------

    def pop(self, memory: GuestMemory) -> DescChain | None:
        """The next request, or None when the ring is empty. Raises BrokenRing."""
        assert self._avail is not None
        if self._resubmit:
            head = self._resubmit.pop(0).head
            return self._walk(head, memory)
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise BrokenRing(
                f"queue {self.index}: guest moved the avail index {pending} entries ahead "
                f"of a {self.num}-entry ring (avail index {avail_idx}, device at "
                f"{self.last_avail_idx}, reread {self.avail_idx()})"
            )
        assert self._avail16 is not None
        head = self._avail16[2 + self.last_avail_idx % self.num]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.num:
            raise BrokenRing(f"queue {self.index}: avail ring names head {head} of {self.num}")
        chain = self._walk(head, memory)
        if self.inflight is not None:
            self.inflight.get(head)
        return chain

    def _walk(self, head: int, memory: GuestMemory) -> DescChain:
        assert self._desc is not None
        table: memoryview = self._desc
        table_size = self.num
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        index = head
        seen = 0
        in_indirect = False
        fault: str | None = None
        while True:
            if index >= table_size:
                raise BrokenRing(
                    f"queue {self.index}: descriptor next {index} is beyond the "
                    f"{table_size}-entry table (head {head})"
                )
            seen += 1
            if seen > table_size:
                raise BrokenRing(
                    f"queue {self.index}: descriptor chain at head {head} is longer "
                    f"than its table ({table_size}): a loop"
                )
            addr, length, flags, nxt = VirtqDesc.unpack_from(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise BrokenRing(f"queue {self.index}: nested indirect table at head {head}")
                if not self.indirect:
                    raise BrokenRing(
                        f"queue {self.index}: indirect descriptor without "
                        "VIRTIO_RING_F_INDIRECT_DESC"
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise BrokenRing(
                        f"queue {self.index}: indirect descriptor with NEXT set (head {head})"
                    )
                if length == 0 or length % VirtqDesc.size:
                    raise BrokenRing(
                        f"queue {self.index}: indirect table length {length} is not "
                        "a non-zero multiple of 16"
                    )
                try:
                    table = memory.gpa_contiguous(addr, length)
                except GuestError as exc:
                    raise BrokenRing(f"queue {self.index}: indirect table: {exc}") from exc
                table_size = length // VirtqDesc.size
                in_indirect = True
                index = 0
                seen = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(Buffer(addr, length))
            else:
                if writable and fault is None:
                    fault = "a device-readable descriptor follows a device-writable one"
                readable.append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = nxt
        last_writable = bool(flags & VIRTQ_DESC_F_WRITE)
        return DescChain(head, tuple(readable), tuple(writable), fault, last_writable)

    def push(self, head: int, length: int) -> None:
        """Return a finished request to the guest (used ring, then used->idx)."""
        assert self._used is not None and self._used16 is not None
        slot = self.used_idx % self.num
        VirtqUsedElem.pack_into(self._used, 4 + 8 * slot, head, length)
        if self.inflight is not None:
            self.inflight.pre_put(head)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx
        if self.inflight is not None:
            self.inflight.post_put(head, self.used_idx)
        self.completed += 1


def signal_eventfd(fd: int) -> None:
    try:
        os.write(fd, _EVENT.pack(1))
    except BlockingIOError:
        pass  # the counter is saturated: the other side has a wakeup pending anyway
    except OSError as exc:
        log.debug("eventfd %d write failed: %s", fd, exc)
