"""`log-writes`: record every request that passes, for the durability oracle.

A filter node: data passes through unchanged, and each write, FUA write,
write-zeroes, discard and flush leaves a SUBMIT record before it goes down
and a COMPLETE record after it returns (format: `harness.durability.writelog`).
Put it at the top of the graph so it sees exactly what the guest was told.

Options: `log` (path, required), `log-data` (also record the written bytes,
needed for `powercut log export`; default off), `preimage` (record the CRCs of
each sector before its first write, so the oracle can tell the initial content
from garbage; default on), `sector-size` (checksum granularity, default 512).

Whoever owns the device's write-cache state (the BlockBackend) reports it and
its changes through `write_cache_changed()`; every SUBMIT carries the state at that
time (or "unknown" until it is reported). The FUA flag is recorded either way,
and it is what the durability contract reads: without a write cache every
write arrives as FUA.

A write is checksummed and passed down from one private copy of its data, never
from the caller's buffers: those are the guest's memory, and a guest may change
them while the request is in flight (Linux redirties a page under writeback
without waiting unless the device asks for stable pages, and virtio-blk does
not). Checksumming the guest's buffer and then writing it could put on the image
a version no record names — a "corrupt" sector for the oracle that the guest
never caused. The copy is what a device that transfers the data at submission
writes; a page-aligned per-thread buffer, so `cache.direct` still needs no bounce.
"""

from __future__ import annotations

import errno
import logging
import mmap
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import register_driver
from harness.durability.writelog import (
    LogFlags,
    LogHeader,
    LogRecordType,
    LogWriter,
    Op,
    ReqFlags,
    aligned_sector_crcs,
    crc_bytes,
    sector_crcs,
    sector_packer,
    whole_sectors,
)
from harness.errors import ConfigError

log = logging.getLogger(__name__)

_FUA = int(ReqFlags.FUA)
_WCE = int(ReqFlags.WCE)
_WCE_KNOWN = int(ReqFlags.WCE_KNOWN)
_HAS_PRE = int(ReqFlags.HAS_PRE)
_HAS_DATA = int(ReqFlags.HAS_DATA)
_NO_FLAGS = RequestFlags.NONE
_crc32 = zlib.crc32
# Module constants for the per-write records: enum attribute lookups are slow.
_SUBMIT = LogRecordType.SUBMIT
_COMPLETE = LogRecordType.COMPLETE
_WRITE = Op.WRITE
_NONE_OP = Op.NONE
_FULL = b"\xff" * 4096  # a run of fully seen bitmap bytes
PREIMAGE_CHUNK = 1 << 20  # bytes read at a time for the initial CRCs of a large request
SNAPSHOT_KEEP = 4 << 20  # largest per-thread snapshot buffer kept between writes


@register_driver
class LogWritesNode(BlockNode):
    driver: ClassVar[str] = "log-writes"
    is_filter: ClassVar[bool] = True
    has_child: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = {
        "log": Option(str, required=True, help="write log path"),
        "log-data": Option(bool, False, help="record the data of every write too"),
        "preimage": Option(bool, True, help="record sector CRCs before their first write"),
        "sector-size": Option(int, 512, size=True, help="checksum granularity in bytes"),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        if file is None:
            raise ConfigError(f"log-writes node {node_name!r} needs a file child")
        self.child: BlockNode = file
        self.log_path = Path(str(self._opt("log")))
        self.log_data = bool(self._opt("log-data"))
        self.preimage = bool(self._opt("preimage"))
        self.sector_size = int(self._opt("sector-size"))
        if self.sector_size < 512 or self.sector_size & (self.sector_size - 1):
            raise ConfigError(f"log-writes node {node_name!r}: sector-size must be a power of two")
        self.supported_write_flags = RequestFlags.FUA  # recorded, then passed down
        self.supported_zero_flags = (
            RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
        )
        self.can_discard = True
        self.can_write_zeroes = True
        self.request_alignment = file.request_alignment
        lflags = LogFlags.NONE
        if self.log_data:
            lflags |= LogFlags.DATA
        if self.preimage:
            lflags |= LogFlags.PREIMAGE
        if flags.no_flush:
            lflags |= LogFlags.NO_FLUSH
        if flags.direct:
            lflags |= LogFlags.DIRECT
        self._lock = threading.Lock()
        self._scratch = threading.local()  # each thread's snapshot buffer (see the docstring)
        self.writer = LogWriter(self.log_path, LogHeader(self.sector_size, lflags, 0))
        self._seq = self.writer.next_seq
        # Unknown until the BlockBackend above reports it (at open and on every switch);
        # FUA flags are recorded either way, and they are what the contract reads.
        self.write_cache: bool | None = None
        self._wce_bits = 0  # the SUBMIT flags that say `write_cache`
        self._packers: dict[int, tuple[Any, list[slice]]] = {}  # sector count -> CRC packer
        nsect = -(-self.child.length // self.sector_size)
        self._seen = bytearray(-(-nsect // 8))  # sectors already written through this log
        self.writer.append(LogRecordType.OPEN, Op.NONE, 0, 0, 0, 0)

    def _opt(self, name: str) -> Any:
        value = self.opts.get(name)
        return self.options[name].default if value is None else value

    # -- recording ---------------------------------------------------------------

    def driver_write_cache_changed(self, enabled: bool) -> None:
        """The device's write cache was switched (at open, and by virtio-blk `wce`)."""
        with self._lock:
            self.write_cache = bool(enabled)
            self._wce_bits = _WCE_KNOWN | (_WCE if enabled else 0)
            self.writer.append(LogRecordType.WRITE_CACHE, Op.NONE, int(enabled), 0, 0, 0)

    def mark(self, label: str) -> None:
        """A named point in the log (like `dmsetup message ... mark`)."""
        with self._lock:
            self.writer.append(LogRecordType.MARK, Op.NONE, 0, 0, 0, 0, [label.encode()])

    def _submit(
        self,
        op: Op,
        flags: int,
        offset: int,
        length: int,
        payload: list[bytes | bytearray | memoryview] | None = None,
    ) -> int:
        # Caller holds self._lock.
        seq = self._seq
        self._seq += 1
        self.writer.append(
            LogRecordType.SUBMIT, op, flags | self._wce_bits, seq, offset, length, payload
        )
        return seq

    def _unseen(self, first: int, count: int) -> bool:
        seen = self._seen
        if not first & 7 and not count & 7:
            # Whole bytes of the bitmap (4 KiB-aligned requests): compare them at once.
            n = count >> 3
            return seen[first >> 3 : (first >> 3) + n] != (_FULL[:n] if n <= 4096 else b"\xff" * n)
        return any(not seen[s >> 3] & 1 << (s & 7) for s in range(first, first + count))

    def _mark_seen(self, first: int, count: int) -> None:
        seen = self._seen
        if not first & 7 and not count & 7:
            n = count >> 3
            seen[first >> 3 : (first >> 3) + n] = _FULL[:n] if n <= 4096 else b"\xff" * n
            return
        for s in range(first, first + count):
            seen[s >> 3] |= 1 << (s & 7)

    def _run(self, seq: int, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except BaseException as exc:
            self._failed(seq, exc)
            raise
        with self._lock:
            self.writer.append(LogRecordType.COMPLETE, Op.NONE, 0, seq, 0, 0)

    # -- requests ----------------------------------------------------------------

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        self.child.preadv(offset, iov)

    def _snapshot(self, iov: IOVec) -> memoryview:
        """The request's data, copied once out of the caller's buffers (see the docstring)."""
        length = len(iov[0]) if len(iov) == 1 else sum(map(len, iov))
        scratch = self._scratch
        area: mmap.mmap | None = getattr(scratch, "area", None)
        if area is None or len(area) < length:
            area = mmap.mmap(-1, max(length, mmap.PAGESIZE))  # page-aligned: O_DIRECT as is
            if length <= SNAPSHOT_KEEP:
                scratch.area = area
        buf = memoryview(area)[:length]
        if len(iov) == 1:
            buf[:] = iov[0]
        else:
            pos = 0
            for view in iov:
                n = len(view)
                buf[pos : pos + n] = view
                pos += n
        return buf

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        # One snapshot is checksummed, logged and written: the guest may change its buffers
        # while the request is in flight.
        buf = self._snapshot(iov)
        length = len(buf)
        ss = self.sector_size
        fua = flags is not _NO_FLAGS and RequestFlags.FUA in flags
        if offset % ss or length % ss:
            first, count = whole_sectors(offset, length, ss)
            crcs = crc_bytes(sector_crcs(buf, offset, ss))
        else:
            first, count = offset // ss, length // ss
            packer = self._packers.get(count)
            if packer is None:
                crcs = aligned_sector_crcs(buf, ss)
                if count <= 256:
                    self._packers[count] = sector_packer(count, ss)
            else:
                # aligned_sector_crcs, inlined: this line is most of a logged write's CPU.
                crcs = packer[0](*map(_crc32, map(buf.__getitem__, packer[1])))
        # No span CRC: the reader derives it from the sector CRCs (writelog.span_crc).
        with self._lock:
            rflags = self._wce_bits | (_FUA if fua else 0)
            if (
                count
                and self.preimage
                and (self._seen[first >> 3] != 0xFF or count > 8 or first & 7 or count & 7)
                and self._unseen(first, count)
            ):
                pre = bytearray(count * ss)
                self.child.preadv(first * ss, [memoryview(pre)])
                payload: list[bytes | bytearray | memoryview] = [
                    crcs,
                    aligned_sector_crcs(pre, ss),
                ]
                rflags |= _HAS_PRE
                self._mark_seen(first, count)
            else:
                payload = [crcs]
            if self.log_data:
                payload.append(buf)
                rflags |= _HAS_DATA
            seq = self._seq
            self._seq = seq + 1
            self.writer.append(_SUBMIT, _WRITE, rflags, seq, offset, length, payload)
        try:
            self.child.pwritev(offset, [buf], flags)
        except BaseException as exc:
            self._failed(seq, exc)
            raise
        with self._lock:
            self.writer.append(_COMPLETE, _NONE_OP, 0, seq, 0, 0)

    def _failed(self, seq: int, exc: BaseException) -> None:
        status = int(getattr(exc, "errno", None) or errno.EIO)
        with self._lock:
            self.writer.append(LogRecordType.COMPLETE, Op.NONE, 0, seq, 0, status)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        rflags = 0
        fua = RequestFlags.FUA in flags
        if fua:
            rflags |= _FUA
        if RequestFlags.MAY_UNMAP in flags:
            rflags |= int(ReqFlags.MAY_UNMAP)
        with self._lock:
            self._record_preimage(offset, length)
            seq = self._submit(Op.WRITE_ZEROES, rflags, offset, length)
        self._run(seq, self.child.pwrite_zeroes, offset, length, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        with self._lock:
            self._record_preimage(offset, length)
            seq = self._submit(Op.DISCARD, 0, offset, length)
        self._run(seq, self.child.pdiscard, offset, length)

    def _record_preimage(self, offset: int, length: int) -> None:
        # Zeroes and discards carry no CRCs, but a sector first touched by one still has an
        # initial content the oracle must know: a PREIMAGE record says what it was.
        ss = self.sector_size
        first, count = whole_sectors(offset, length, ss)
        if not (self.preimage and count and self._unseen(first, count)):
            return
        step = max(1, PREIMAGE_CHUNK // ss)
        for chunk in range(first, first + count, step):
            n = min(step, first + count - chunk)
            pre = bytearray(n * ss)
            self.child.preadv(chunk * ss, [memoryview(pre)])
            crcs = crc_bytes(sector_crcs(pre, chunk * ss, ss))
            self.writer.append(LogRecordType.PREIMAGE, Op.NONE, 0, 0, chunk * ss, n * ss, [crcs])
        self._mark_seen(first, count)

    def driver_flush(self) -> None:
        with self._lock:
            seq = self._submit(Op.FLUSH, 0, 0, 0)
        self._run(seq, self.child.flush)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {"log": str(self.log_path), "log-data": self.log_data, "requests": self._seq - 1}
        )
        return info

    def driver_close(self) -> None:
        with self._lock:
            self.writer.close()
