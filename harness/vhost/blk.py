"""The virtio-blk device (virtio 1.2 section 5.2) over a BlockBackend.

One request is one descriptor chain: a 16-byte `VirtioBlkOuthdr` at the
start of the device-readable buffers, data in between, and the status byte
as the last byte of the last (device-writable) descriptor. Data buffers are
memoryviews straight into mapped guest memory, handed to the block stack's
readv/writev: nothing is copied on the way.

What the guest sees of the write cache (`writeback` in the config space) is
the BlockBackend's; a guest write to it goes to `set_write_cache`, which is
what decides whether later writes carry FUA. Any other config write is
refused and logged.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from harness.errors import BlockError, GuestError
from harness.vhost.memory import GuestMemory
from harness.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES
from harness.vhost.virtio import (
    VIRTIO_BLK_CONFIG_WCE_OFFSET,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_BITS,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlkConfig,
    VirtioBlkDiscardWriteZeroes,
    VirtioBlkFeature,
    VirtioBlkOuthdr,
    VirtioBlkRequestType,
    VirtioBlkStatus,
    VirtioFeature,
)
from harness.vhost.virtqueue import DescChain

log = logging.getLogger(__name__)

# Limits the device advertises (config space); chosen like QEMU's virtio-blk.
SIZE_MAX = 1 << 20  # largest single segment
SEG_MAX = 126  # segments per request: queue size 128 - 2 (header + status)
MAX_DISCARD_SECTORS = 0x3FFFFF  # 2 GiB - 512 per segment, as QEMU's BDRV_REQUEST_MAX_SECTORS
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
MAX_WRITE_ZEROES_SEG = 1


_REQUEST_TYPES = {t.value: t for t in VirtioBlkRequestType}
_TYPE_NAMES = {t: t.name for t in VirtioBlkRequestType}


class BlockBackendLike(Protocol):
    """What the device needs from harness.block's BlockBackend."""

    @property
    def length(self) -> int: ...

    read_only: bool

    def readv(self, offset: int, iov: Sequence[memoryview]) -> None: ...

    def writev(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None: ...

    def set_write_cache(self, enabled: bool) -> None: ...

    @property
    def enable_write_cache(self) -> bool: ...


class NoStatusByte(GuestError):
    """The request has no writable status byte: only NEEDS_RESET can tell the guest."""


class _RequestFailed(Exception):
    """Internal: finish this request with `status`; `cause` is what the guest did wrong."""

    def __init__(self, status: VirtioBlkStatus, kind: str, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.kind = kind
        self.cause = cause


@dataclass(frozen=True)
class BlkConfig:
    """How the device presents itself."""

    num_queues: int = 1
    serial: str = ""
    logical_block_size: int = 512
    read_only: bool = False


class VirtioBlkDevice:
    """Executes virtio-blk requests against a backend. Thread-safe (one call per queue)."""

    def __init__(self, backend: BlockBackendLike, config: BlkConfig) -> None:
        bs = config.logical_block_size
        if bs < VIRTIO_BLK_SECTOR_SIZE or bs & (bs - 1) or bs > 1 << 16:
            raise ValueError(f"logical block size {bs} must be a power of two from 512 to 64k")
        self.backend = backend
        self.config = config
        self.read_only = config.read_only or bool(getattr(backend, "read_only", False))
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._reported: set[str] = set()

    # -- features and config space -------------------------------------------

    def features(self) -> int:
        bits = [
            VirtioBlkFeature.SIZE_MAX,
            VirtioBlkFeature.SEG_MAX,
            VirtioBlkFeature.BLK_SIZE,
            VirtioBlkFeature.TOPOLOGY,
            VirtioBlkFeature.FLUSH,
            VirtioBlkFeature.CONFIG_WCE,
            VirtioBlkFeature.MQ,
            VirtioFeature.VERSION_1,
            VirtioFeature.RING_INDIRECT_DESC,
            VirtioFeature.RING_EVENT_IDX,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        if self.read_only:
            bits.append(VirtioBlkFeature.RO)
        else:
            bits += [VirtioBlkFeature.DISCARD, VirtioBlkFeature.WRITE_ZEROES]
        mask = 0
        for bit in bits:
            mask |= 1 << int(bit)
        return mask

    def config_space(self) -> bytes:
        bs = self.config.logical_block_size
        sectors_per_block = bs // VIRTIO_BLK_SECTOR_SIZE
        return VirtioBlkConfig.pack(
            self.backend.length >> VIRTIO_BLK_SECTOR_BITS,  # capacity in 512-byte sectors
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # geometry: none
            bs,
            0,
            0,
            1,
            0,  # topology: physical = logical, aligned, min_io 1 block, no opt
            1 if self.backend.enable_write_cache else 0,
            0,
            self.config.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            sectors_per_block,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap
            0,
            0,
            0,  # secure erase: not offered
        )

    def read_config(self, offset: int, size: int) -> bytes:
        space = self.config_space()
        data = space[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> bool:
        """A guest write to the config space; only `writeback` may change."""
        if offset == VIRTIO_BLK_CONFIG_WCE_OFFSET and len(data) == 1:
            enabled = data[0] != 0
            self.backend.set_write_cache(enabled)
            log.info("guest turned the write cache %s", "on" if enabled else "off")
            return True
        log.warning(
            "guest config write of %d bytes at offset %d refused: only writeback "
            "(offset %d) is writable",
            len(data),
            offset,
            VIRTIO_BLK_CONFIG_WCE_OFFSET,
        )
        return False

    # -- requests --------------------------------------------------------------

    def handle(self, chain: DescChain, memory: GuestMemory) -> int:
        """Run one request; returns the used length. Raises NoStatusByte."""
        status_view = self._status_view(chain, memory)
        try:
            status, written = self._execute(chain, memory)
        except _RequestFailed as failed:
            status, written = failed.status, 0
            self._report(failed.kind, failed.cause)
        except BlockError as exc:
            status = VirtioBlkStatus.UNSUPP if exc.errno == errno.ENOTSUP else VirtioBlkStatus.IOERR
            written = 0
            self._report(f"block-{exc.errno}", f"I/O error returned to the guest: {exc}")
        status_view[0] = status
        return written + 1

    def _status_view(self, chain: DescChain, memory: GuestMemory) -> memoryview:
        if not chain.writable or not chain.last_writable:
            raise NoStatusByte(
                f"request at head {chain.head} has no device-writable status descriptor at its end"
            )
        last = chain.writable[-1]
        if last.length < 1:
            raise NoStatusByte(f"request at head {chain.head}: status descriptor is empty")
        try:
            return memory.gpa_contiguous(last.addr + last.length - 1, 1)
        except GuestError as exc:
            raise NoStatusByte(f"request at head {chain.head}: status byte: {exc}") from exc

    def _execute(self, chain: DescChain, memory: GuestMemory) -> tuple[VirtioBlkStatus, int]:
        ioerr = VirtioBlkStatus.IOERR
        if chain.fault is not None:
            raise _RequestFailed(ioerr, "layout", f"request at head {chain.head}: {chain.fault}")
        readable_bufs, writable_bufs = chain.readable, chain.writable
        try:
            if readable_bufs and readable_bufs[0].length == VirtioBlkOuthdr.size:
                # What Linux sends: the header alone in the first descriptor.
                rtype, _ioprio, sector = VirtioBlkOuthdr.unpack(
                    memory.gpa_contiguous(readable_bufs[0].addr, VirtioBlkOuthdr.size)
                )
                out_data = []
                for b in readable_bufs[1:]:
                    out_data += memory.gpa(b.addr, b.length)
            else:
                readable = []
                for b in readable_bufs:
                    readable += memory.gpa(b.addr, b.length)
                header, out_data = _split_front(readable, VirtioBlkOuthdr.size)
                if header is None:
                    raise _RequestFailed(
                        ioerr,
                        "header",
                        f"request at head {chain.head}: missing or short "
                        f"request header ({sum(map(len, readable))} of 16 bytes)",
                    )
                rtype, _ioprio, sector = VirtioBlkOuthdr.unpack(header)
            if writable_bufs[-1].length == 1:  # the status byte alone: the rest is data
                in_data = []
                for b in writable_bufs[:-1]:
                    in_data += memory.gpa(b.addr, b.length)
            else:
                writable = []
                for b in writable_bufs:
                    writable += memory.gpa(b.addr, b.length)
                in_data = _drop_back(writable, 1)
        except GuestError as exc:
            raise _RequestFailed(ioerr, "address", f"request at head {chain.head}: {exc}") from exc
        kind = _REQUEST_TYPES.get(rtype)
        if kind is None:
            raise _RequestFailed(VirtioBlkStatus.UNSUPP, "type", f"unknown request type {rtype}")
        self.counts[_TYPE_NAMES[kind]] += 1
        if kind is VirtioBlkRequestType.IN:
            length = sum(map(len, in_data))
            offset = self._check_range(sector, length, "read")
            if length:
                self.backend.readv(offset, in_data)
            return VirtioBlkStatus.OK, length
        if kind is VirtioBlkRequestType.OUT:
            length = sum(map(len, out_data))
            self._check_writable("write")
            offset = self._check_range(sector, length, "write")
            if length:
                self.backend.writev(offset, out_data)
            return VirtioBlkStatus.OK, 0
        if kind is VirtioBlkRequestType.FLUSH:
            self.backend.flush()
            return VirtioBlkStatus.OK, 0
        if kind is VirtioBlkRequestType.GET_ID:
            serial = self.config.serial.encode()[:VIRTIO_BLK_ID_BYTES]
            serial += bytes(VIRTIO_BLK_ID_BYTES - len(serial))
            return VirtioBlkStatus.OK, _scatter(in_data, serial)
        if kind in (VirtioBlkRequestType.DISCARD, VirtioBlkRequestType.WRITE_ZEROES):
            self._discard_or_zeroes(kind, out_data)
            return VirtioBlkStatus.OK, 0
        raise _RequestFailed(
            VirtioBlkStatus.UNSUPP, "type", f"request type {kind.name} is not supported"
        )

    def _discard_or_zeroes(self, kind: VirtioBlkRequestType, data: list[memoryview]) -> None:
        name = "discard" if kind is VirtioBlkRequestType.DISCARD else "write-zeroes"
        self._check_writable(name)
        raw = b"".join(bytes(v) for v in data)
        seg_size = VirtioBlkDiscardWriteZeroes.size
        max_seg = MAX_DISCARD_SEG if kind is VirtioBlkRequestType.DISCARD else MAX_WRITE_ZEROES_SEG
        if not raw or len(raw) % seg_size:
            raise _RequestFailed(
                VirtioBlkStatus.IOERR,
                "segments",
                f"{name}: {len(raw)} bytes of segments, not a multiple of 16",
            )
        if len(raw) // seg_size > max_seg:
            raise _RequestFailed(
                VirtioBlkStatus.UNSUPP,
                "segments",
                f"{name}: {len(raw) // seg_size} segments, at most {max_seg}",
            )
        max_sectors = (
            MAX_DISCARD_SECTORS
            if kind is VirtioBlkRequestType.DISCARD
            else MAX_WRITE_ZEROES_SECTORS
        )
        for off in range(0, len(raw), seg_size):
            sector, num, flags = VirtioBlkDiscardWriteZeroes.unpack_from(raw, off)
            allowed = (
                0 if kind is VirtioBlkRequestType.DISCARD else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            )
            if flags & ~allowed:
                raise _RequestFailed(
                    VirtioBlkStatus.UNSUPP, "flags", f"{name}: unsupported flags 0x{flags:x}"
                )
            if num > max_sectors:
                raise _RequestFailed(
                    VirtioBlkStatus.IOERR,
                    "range",
                    f"{name}: {num} sectors, more than {max_sectors}",
                )
            offset = self._check_range(sector, num << VIRTIO_BLK_SECTOR_BITS, name)
            length = num << VIRTIO_BLK_SECTOR_BITS
            if kind is VirtioBlkRequestType.DISCARD:
                self.backend.discard(offset, length)
            else:
                self.backend.write_zeroes(
                    offset, length, may_unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                )

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise _RequestFailed(
                VirtioBlkStatus.IOERR, "read-only", f"{what} refused: the disk is read-only"
            )

    def _check_range(self, sector: int, length: int, what: str) -> int:
        bs = self.config.logical_block_size
        offset = sector << VIRTIO_BLK_SECTOR_BITS
        if offset % bs or length % bs:
            raise _RequestFailed(
                VirtioBlkStatus.IOERR,
                "alignment",
                f"{what} at sector {sector}, {length} bytes: not aligned to the "
                f"{bs}-byte logical block size",
            )
        if offset + length > self.backend.length:
            raise _RequestFailed(
                VirtioBlkStatus.IOERR,
                "range",
                f"{what} at sector {sector}, {length} bytes: beyond the "
                f"{self.backend.length}-byte disk",
            )
        return offset

    def _report(self, kind: str, cause: str) -> None:
        """Log a guest-visible failure: the first of each kind loudly, later ones quietly."""
        with self._lock:
            self.counts[f"error:{kind}"] += 1
            first = kind not in self._reported
            self._reported.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "virtio-blk: %s", cause)


def _split_front(views: list[memoryview], n: int) -> tuple[bytes | None, list[memoryview]]:
    """The first `n` bytes (copied: it is a header) and views of the rest."""
    head = bytearray()
    rest: list[memoryview] = []
    for view in views:
        need = n - len(head)
        if need > 0:
            head += view[:need]
            if len(view) > need:
                rest.append(view[need:])
        else:
            rest.append(view)
    if len(head) < n:
        return None, []
    return bytes(head), rest


def _drop_back(views: list[memoryview], n: int) -> list[memoryview]:
    """Views of everything but the last `n` bytes."""
    out = list(views)
    while n > 0 and out:
        last = out.pop()
        if len(last) > n:
            out.append(last[: len(last) - n])
            n = 0
        else:
            n -= len(last)
    return [v for v in out if len(v)]


def _scatter(views: list[memoryview], data: bytes) -> int:
    done = 0
    for view in views:
        if done >= len(data):
            break
        n = min(len(view), len(data) - done)
        view[:n] = data[done : done + n]
        done += n
    return done
