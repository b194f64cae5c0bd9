"""Virtio wire formats: feature bits, split-ring layouts, virtio-blk structures.

Section numbers refer to the Virtual I/O Device (VIRTIO) Version 1.2 spec.
"""

from __future__ import annotations

import enum
import struct
import sys
import threading

# 2.7.5 "The Virtqueue Descriptor Table": le64 addr, le32 len, le16 flags, le16 next.
VirtqDesc = struct.Struct("<QIHH")
# 2.7.6 "The Virtqueue Available Ring": le16 flags, le16 idx, then le16 ring[], le16 used_event.
VirtqAvailHeader = struct.Struct("<HH")
# 2.7.8 "The Virtqueue Used Ring": le16 flags, le16 idx, then elems, then le16 avail_event.
VirtqUsedHeader = struct.Struct("<HH")
# 2.7.8 struct virtq_used_elem: le32 id, le32 len.
VirtqUsedElem = struct.Struct("<II")
Le16 = struct.Struct("<H")

if sys.byteorder != "little":
    raise ImportError("harness.vhost needs a little-endian host (virtio rings are little-endian)")


def ring_u16(view: memoryview) -> memoryview:
    """`view` as an array of native u16 (little-endian here).

    Ring indices, flags and event fields change under our feet: the other
    side writes them concurrently. struct's pack/unpack assemble values byte
    by byte and can see half an update (measured: thousands of torn reads a
    second between two processes); indexing a memoryview cast to "H" is one
    16-bit load or store.
    """
    return view.cast("B").cast("H")


_fence = threading.Lock()


def memory_barrier() -> None:
    """A full memory barrier (virtio_mb): an uncontended lock is a locked RMW on x86."""
    _fence.acquire()
    _fence.release()


VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

VIRTQUEUE_MAX_SIZE = 1024


class VirtioFeature(enum.IntEnum):
    """Device-independent feature bits (6 "Reserved Feature Bits") and vhost's own."""

    NOTIFY_ON_EMPTY = 24
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


class VirtioBlkFeature(enum.IntEnum):
    """5.2.3 "Feature bits" of the block device."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class DeviceStatus(enum.IntFlag):
    """2.1 "Device Status Field"."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class VirtioBlkRequestType(enum.IntEnum):
    """5.2.6 "Device Operation": VIRTIO_BLK_T_*."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class VirtioBlkStatus(enum.IntEnum):
    """5.2.6 VIRTIO_BLK_S_*: the last byte the device writes for a request."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# 5.2.6 struct virtio_blk_req header: le32 type, le32 reserved (ioprio), le64 sector.
VirtioBlkOuthdr = struct.Struct("<IIQ")
# 5.2.6 struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
VirtioBlkDiscardWriteZeroes = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_SECTOR_BITS = 9
VIRTIO_BLK_ID_BYTES = 20

# 5.2.4 struct virtio_blk_config, up to and including write_zeroes_may_unmap and
# the secure-erase fields (1.2): capacity, size_max, seg_max, geometry
# (cylinders, heads, sectors), blk_size, topology (physical_block_exp,
# alignment_offset, min_io_size, opt_io_size), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap,
# unused1[3], max_secure_erase_sectors, max_secure_erase_seg,
# secure_erase_sector_alignment.
VirtioBlkConfig = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
VIRTIO_BLK_CONFIG_WCE_OFFSET = 32
VIRTIO_BLK_CONFIG_NUM_QUEUES_OFFSET = 34


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.7.2: notify when `event_idx` lies in the window of entries just added."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def split_ring_sizes(num: int) -> tuple[int, int, int]:
    """Byte sizes of the descriptor table, available ring and used ring (2.7)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num
