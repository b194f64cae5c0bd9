"""The write log: every request the `log-writes` node saw, in the order it saw them.

The log is what the guest was told. Each request leaves a SUBMIT record
before it is passed down and a COMPLETE record after it returns, so the file
order is a total order of events: a write whose COMPLETE precedes a flush's
SUBMIT had completed before that flush started — the fact the durability
contract is written in. Sector contents are identified by CRC-32 per sector,
which is enough to recognise any data (also fio's) in an image after a cut;
the data itself is optional (`log-data=on`), needed only to export for
dm-log-writes tools.

Append-only, stored through a shared mapping of the file
(`harness.durability.mapped`), payload first and header last: every record is in
the host page cache when `append` returns, so a SIGKILLed backend loses no
record and tears at most the last one, which the reader ignores. (Version 1
held the COMPLETE record of a plain write in memory until the next record to
save a `write(2)`; a crash could make such a write look in flight. Version 2
writes every record at once.)

Format, version 2 (version 1 is read too; it differs only as noted),
little-endian:

    file header  LOG_HEADER (32 bytes)
        magic       8s   b"PCWLOG\\0\\1"
        version     u16  2
        header_size u16  32
        sector_size u32  checksum granularity (512)
        flags       u32  LogFlags
        created_ns  u64  CLOCK_REALTIME
        crc32       u32  of the 28 bytes before it

    records  LOG_RECORD header (44 bytes) + payload
        crc32       u32  of the rest of the header and the payload
        type        u8   LogRecordType
        op          u8   Op (SUBMIT, COMPLETE)
        flags       u8   ReqFlags (SUBMIT); WRITE_CACHE: 1 if enabled
        reserved    u8   0
        payload_len u32
        seq         u64  request sequence number, 1, 2, 3 ... in submit order
        offset      u64  SUBMIT: byte offset
        length      u64  SUBMIT: byte length; COMPLETE: errno (0 = success)
        time_ns     u64  CLOCK_MONOTONIC

    SUBMIT payload for WRITE: n u32 CRC-32s, one per whole sector inside
        [offset, offset + length) (partial sectors have none); then, with
        HAS_SPAN_CRC, one u32 CRC-32 over those n sectors at once (version 1
        writers set it; version 2 writers leave it out, a 4 KiB CRC pass per
        write, and the reader derives the same value from the sector CRCs:
        `span_crc`); then, with HAS_PRE, n u32 CRC-32s of those sectors before the write (recorded
        for the first write to a sector in this log: the initial content);
        then, with HAS_DATA, the `length` bytes written.
    MARK payload: a UTF-8 label (`LogWritesNode.mark`).
    PREIMAGE payload: u32 CRC-32s of the whole sectors of [offset, offset + length)
        before a write-zeroes or discard first touched them (the initial content).

    then zero padding (version 2): the writer grows the file ahead of its
    records; a record header of zeroes followed only by zeroes ends them.
"""

from __future__ import annotations

import bisect
import enum
import logging
import mmap
import os
import struct
import sys
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.durability.mapped import MappedAppender, all_zero
from harness.errors import JournalError

log = logging.getLogger(__name__)

# File header; fields in the module docstring.
LOG_HEADER = struct.Struct("<8sHHIIQI")
# Record header; fields in the module docstring.
LOG_RECORD = struct.Struct("<IBBBBIQQQQ")
# LOG_RECORD after its crc32 field: what the CRC covers, packed without slicing.
LOG_RECORD_BODY = struct.Struct("<" + LOG_RECORD.format[2:])

_CRC = struct.Struct("<I")  # the crc32 field at the start of each record
_pack_crc = _CRC.pack
_pack_body = LOG_RECORD_BODY.pack
_crc32 = zlib.crc32
_monotonic_ns = time.monotonic_ns
LOG_MAGIC = b"PCWLOG\x00\x01"
LOG_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 differs only in the zero padding it may end in
_CRC_BIG_ENDIAN_HOST = sys.byteorder == "big"


class LogFlags(enum.IntFlag):
    NONE = 0
    DATA = 1  # write data recorded
    PREIMAGE = 2  # initial sector checksums recorded
    NO_FLUSH = 4  # the node was opened with cache.no-flush (unsafe)
    DIRECT = 8  # the node was opened with cache.direct


class LogRecordType(enum.IntEnum):
    SUBMIT = 1
    COMPLETE = 2
    WRITE_CACHE = 3
    OPEN = 4
    MARK = 5
    PREIMAGE = 6


class Op(enum.IntEnum):
    NONE = 0
    WRITE = 1
    WRITE_ZEROES = 2
    DISCARD = 3
    FLUSH = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class ReqFlags(enum.IntFlag):
    NONE = 0
    FUA = 1
    WCE = 2  # the device's write cache was enabled when this was submitted
    MAY_UNMAP = 4
    HAS_DATA = 8
    HAS_PRE = 16
    WCE_KNOWN = 32  # WCE is meaningful (the device's owner reported its write cache)
    HAS_SPAN_CRC = 64  # one CRC-32 over all the whole sectors follows the per-sector ones


_FUA = int(ReqFlags.FUA)
_HAS_PRE = int(ReqFlags.HAS_PRE)
_HAS_SPAN_CRC = int(ReqFlags.HAS_SPAN_CRC)
_HAS_DATA = int(ReqFlags.HAS_DATA)
_OPS = {int(o): o for o in Op}


def sector_crcs(buf: bytes | bytearray | memoryview, offset: int, sector_size: int) -> array[int]:
    """CRC-32 of each whole sector of `buf`, which starts at byte `offset` of the device."""
    mv = memoryview(buf)
    first = -(-offset // sector_size) * sector_size - offset
    stop = len(mv) - (offset + len(mv)) % sector_size
    return array(
        "I",
        [
            zlib.crc32(mv[i : i + sector_size])
            for i in range(first, stop - sector_size + 1, sector_size)
        ],
    )


_SECTOR_CACHE_MAX = 256  # sector counts with a cached packer (requests up to 128 KiB)
_sector_packers: dict[tuple[int, int], tuple[Any, list[slice]]] = {}


def sector_packer(count: int, sector_size: int) -> tuple[Any, list[slice]]:
    """(pack function, sector slices) for the CRCs of `count` aligned sectors."""
    entry = _sector_packers.get((sector_size, count))
    if entry is None:
        entry = (
            struct.Struct(f"<{count}I").pack,
            [slice(i, i + sector_size) for i in range(0, count * sector_size, sector_size)],
        )
        if count <= _SECTOR_CACHE_MAX:
            _sector_packers[(sector_size, count)] = entry
    return entry


def aligned_sector_crcs(buf: bytes | bytearray | memoryview, sector_size: int) -> bytes:
    """`sector_crcs` of a sector-aligned buffer, packed as the log stores them.

    The hot path of every logged write: one C-level `map` over precomputed slices and
    one precomputed packer, instead of a Python loop and an array per request.
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    pack, slices = sector_packer(len(mv) // sector_size, sector_size)
    return pack(*map(zlib.crc32, map(mv.__getitem__, slices)))


_shift_tables: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}


def _shift_table(sector_size: int) -> tuple[list[int], list[int], list[int], list[int]]:
    # CRC-32 is affine: crc32(B, seed) == crc32(B) ^ Z(seed) with Z linear over GF(2)
    # (Z(x) = crc32(zeros, x) ^ crc32(zeros)), so Z is four byte-indexed tables.
    tables = _shift_tables.get(sector_size)
    if tables is None:
        zeros = bytes(sector_size)
        z0 = zlib.crc32(zeros)
        t0, t1, t2, t3 = (
            [zlib.crc32(zeros, b << (8 * k)) ^ z0 for b in range(256)] for k in range(4)
        )
        tables = _shift_tables[sector_size] = (t0, t1, t2, t3)
    return tables


def span_crc(crcs: array[int] | list[int], sector_size: int) -> int:
    """CRC-32 of consecutive sectors from their own CRC-32s (zlib's crc32_combine).

    The oracle's fast path compares one CRC per request; computing it from the
    sector CRCs at read time keeps a 4 KiB CRC pass out of every logged write.
    """
    if not crcs:
        return 0
    t0, t1, t2, t3 = _shift_table(sector_size)
    it = iter(crcs)
    crc = next(it)
    for c in it:
        crc = t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24] ^ c
    return crc


def whole_sectors(offset: int, length: int, sector_size: int) -> tuple[int, int]:
    """(first sector, count) of the sectors entirely inside [offset, offset + length)."""
    first = -(-offset // sector_size)
    last = (offset + length) // sector_size
    return first, max(0, last - first)


def crc_bytes(crcs: array[int]) -> bytes:
    """Per-sector CRCs as the log stores them: little-endian u32s."""
    if _CRC_BIG_ENDIAN_HOST:
        crcs = array("I", crcs)
        crcs.byteswap()
    return crcs.tobytes()


def _crc_array(data: bytes | memoryview) -> array[int]:
    crcs = array("I")
    crcs.frombytes(data)
    if _CRC_BIG_ENDIAN_HOST:
        crcs.byteswap()
    return crcs


@dataclass(frozen=True)
class LogHeader:
    sector_size: int
    flags: LogFlags
    created_ns: int

    def pack(self) -> bytes:
        body = LOG_HEADER.pack(
            LOG_MAGIC,
            LOG_VERSION,
            LOG_HEADER.size,
            self.sector_size,
            int(self.flags),
            self.created_ns,
            0,
        )[:-4]
        return body + struct.pack("<I", zlib.crc32(body))


class LogWriter:
    """Appends records through a shared mapping (`harness.durability.mapped`).

    Every record is in the host page cache when `append` returns, so a killed
    process loses none (version 1 held plain writes' COMPLETE records back to
    save a `write(2)` each; with no system call per record that is not needed).
    """

    def __init__(self, path: Path | str, header: LogHeader) -> None:
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            old = read_log(self.path)  # validates, finds the torn tail
            if old.header.sector_size != header.sector_size:
                raise JournalError(
                    f"write log {self.path} uses sector size {old.header.sector_size}, not "
                    f"{header.sector_size}; pass another log= or remove this one"
                )
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(self._fd, old.valid_length)
            self.next_seq = old.last_seq + 1
            size = old.valid_length
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            packed = header.pack()
            os.write(self._fd, packed)
            self.next_seq = 1
            size = len(packed)
        self._file = MappedAppender(self.path, self._fd, size)

    def append(
        self,
        rtype: LogRecordType,
        op: Op,
        flags: int,
        seq: int,
        offset: int,
        length: int,
        payload: list[bytes | bytearray | memoryview] | None = None,
        time_ns: int | None = None,
    ) -> None:
        """Store one record (header and payload parts); it is in the page cache on return."""
        t = _monotonic_ns() if time_ns is None else time_ns
        if not payload:
            body = _pack_body(rtype, op, flags, 0, 0, seq, offset, length, t)
            self._file.append(_pack_crc(_crc32(body)) + body)
            return
        data = payload[0] if len(payload) == 1 else b"".join(payload)
        body = _pack_body(rtype, op, flags, 0, len(data), seq, offset, length, t)
        self._file.append(_pack_crc(_crc32(data, _crc32(body))) + body, data)

    def sync(self) -> None:
        """Nothing to do: every record is in the page cache already (kept for callers)."""

    def close(self) -> None:
        if self._fd >= 0:
            self._file.close()
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True)
class Request:
    """One request as the log saw it: its SUBMIT and (if any) COMPLETE record merged."""

    seq: int
    op: Op
    flags: int  # ReqFlags bits, kept as a plain int: enum arithmetic is slow in bulk
    offset: int
    length: int
    submit_index: int  # record number of SUBMIT (the log's total order)
    submit_ns: int
    complete_index: int | None = None
    complete_ns: int | None = None
    status: int | None = None  # errno; 0 = success; None = never completed
    crcs: array[int] | None = None
    span_crc: int | None = None  # CRC-32 of all the whole sectors at once (a fast path)
    pre: array[int] | None = None
    data_offset: int | None = None  # file offset of the data in the log

    @property
    def completed_ok(self) -> bool:
        return self.status == 0

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "op": self.op.label,
            "offset": self.offset,
            "length": self.length,
            "fua": self.fua,
            "write_cache": (
                bool(self.flags & int(ReqFlags.WCE))
                if self.flags & int(ReqFlags.WCE_KNOWN)
                else None
            ),
            "submit_ns": self.submit_ns,
            "complete_ns": self.complete_ns,
            "status": self.status,
            "data": self.data_offset is not None,
            "sector_crcs": [f"{c:08x}" for c in self.crcs] if self.crcs is not None else None,
        }


@dataclass
class WriteLog:
    path: Path
    header: LogHeader
    requests: list[Request]  # in submit order
    records: int
    valid_length: int
    torn_bytes: int
    opens: int
    marks: list[tuple[int, str]] = field(default_factory=list)  # (record index, label)
    write_cache_changes: list[tuple[int, bool]] = field(default_factory=list)
    # (record index, first sector, CRCs) from PREIMAGE records
    preimages: list[tuple[int, int, array[int]]] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.requests[-1].seq if self.requests else 0

    def data(self, request: Request) -> bytes:
        if request.data_offset is None:
            raise JournalError(
                f"write log {self.path} has no data for request {request.seq}; "
                "record with log-data=on to export or replay it"
            )
        with open(self.path, "rb") as f:
            f.seek(request.data_offset)
            return f.read(request.length)


def unacknowledged(wlog: WriteLog, spans: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of the byte spans (offset, length), those the disk never acknowledged in full.

    A span is unacknowledged when one of its sectors was never written in the
    log, or the newest request that wrote it (by submission) had not completed
    successfully when the log ended: in flight at the cut, or failed. Whatever
    a checker expects there, no cache mode promises it. (A sector partly
    written counts as written by that request.)
    """
    ss = wlog.header.sector_size
    wanted = sorted(
        {s for offset, length in spans for s in range(offset // ss, -(-(offset + length) // ss))}
    )
    newest: dict[int, Request] = {}
    if wanted:
        for r in wlog.requests:  # in submission order: a later request replaces an earlier one
            if r.op is Op.FLUSH or r.length == 0:
                continue
            lo = bisect.bisect_left(wanted, r.offset // ss)
            hi = bisect.bisect_left(wanted, -(-(r.offset + r.length) // ss))
            for s in wanted[lo:hi]:
                newest[s] = r
    out = set()
    for offset, length in spans:
        for s in range(offset // ss, -(-(offset + length) // ss)):
            last = newest.get(s)
            if last is None or not last.completed_ok:
                out.add((offset, length))
                break
    return out


def _parse_log_header(data: bytes | mmap.mmap, path: Path) -> LogHeader:
    if len(data) < LOG_HEADER.size:
        raise JournalError(f"{path} is too short to be a powercut write log")
    magic, version, header_size, sector_size, flags, created, crc = LOG_HEADER.unpack_from(data)
    if magic != LOG_MAGIC:
        raise JournalError(f"{path} is not a powercut write log (bad magic {magic!r})")
    if version not in READABLE_VERSIONS or header_size != LOG_HEADER.size:
        raise JournalError(
            f"write log {path} has version {version}; this powercut reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if zlib.crc32(bytes(data[: LOG_HEADER.size - 4])) != crc:
        raise JournalError(f"write log {path}: header checksum mismatch; the file is damaged")
    return LogHeader(sector_size, LogFlags(flags), created)


def _iter_records(data: bytes | mmap.mmap) -> Iterator[tuple[int, tuple[int, ...]]]:
    pos = LOG_HEADER.size
    end = len(data)
    unpack = LOG_RECORD.unpack_from
    crc32 = zlib.crc32
    rsize = LOG_RECORD.size
    while pos + rsize <= end:
        fields = unpack(data, pos)
        stop = pos + rsize + fields[5]
        if stop > end or crc32(data[pos + 4 : stop]) != fields[0]:
            return
        yield pos, fields
        pos = stop


def read_log(path: Path | str) -> WriteLog:
    """Read a write log; a torn tail (the backend was killed mid-record) is ignored."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data: bytes = f.read()
    except FileNotFoundError:
        raise JournalError(
            f"write log {path} does not exist; pass the log= of the log-writes node"
        ) from None
    header = _parse_log_header(data, path)
    ss = header.sector_size
    requests: list[Request] = []
    by_seq: dict[int, Request] = {}
    marks: list[tuple[int, str]] = []
    wce: list[tuple[int, bool]] = []
    preimages: list[tuple[int, int, array[int]]] = []
    opens = 0
    index = 0
    valid = LOG_HEADER.size
    rsize = LOG_RECORD.size
    for pos, fields in _iter_records(data):
        _crc, rtype, op, flags, _r, plen, seq, offset, length, t = fields
        payload = pos + rsize
        if rtype == LogRecordType.SUBMIT:
            req = Request(seq, _OPS[op], flags, offset, length, index, t)
            if op == Op.WRITE:
                _first, n = whole_sectors(offset, length, ss)
                req.crcs = _crc_array(data[payload : payload + 4 * n])
                cur = payload + 4 * n
                if flags & _HAS_SPAN_CRC:
                    req.span_crc = _CRC.unpack_from(data, cur)[0]
                    cur += 4
                elif n:
                    req.span_crc = span_crc(req.crcs, ss)
                if flags & _HAS_PRE:
                    req.pre = _crc_array(data[cur : cur + 4 * n])
                    cur += 4 * n
                if flags & _HAS_DATA:
                    req.data_offset = cur
            requests.append(req)
            by_seq[seq] = req
        elif rtype == LogRecordType.COMPLETE:
            done = by_seq.get(seq)
            if done is None:
                raise JournalError(
                    f"write log {path}: completion of unknown request {seq} at byte {pos}"
                )
            done.complete_index = index
            done.complete_ns = t
            done.status = length
        elif rtype == LogRecordType.MARK:
            marks.append((index, data[payload : payload + plen].decode("utf-8", "replace")))
        elif rtype == LogRecordType.WRITE_CACHE:
            wce.append((index, bool(flags & 1)))
        elif rtype == LogRecordType.OPEN:
            opens += 1
        elif rtype == LogRecordType.PREIMAGE:
            first, n = whole_sectors(offset, length, ss)
            preimages.append((index, first, _crc_array(data[payload : payload + 4 * n])))
        else:
            raise JournalError(f"write log {path}: unknown record type {rtype} at byte {pos}")
        index += 1
        valid = payload + plen
    return WriteLog(
        path,
        header,
        requests,
        index,
        valid,
        0 if all_zero(data, valid) else len(data) - valid,  # zero padding is not torn
        opens,
        marks,
        wce,
        preimages,
    )


# -- dm-log-writes export ---------------------------------------------------------

# Linux drivers/md/dm-log-writes.c (and xfstests src/log-writes): the super block in
# the first sector of the log device, then per entry one sector holding the entry
# header (zero padded), followed by nr_sectors sectors of data (none for discards
# and flushes). All fields little-endian; sector numbers in units of sectorsize.
DM_LOG_SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
DM_LOG_ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len
DM_LOG_MAGIC = 0x6A736677736872
DM_LOG_VERSION = 1
DM_LOG_FLUSH = 1 << 0
DM_LOG_FUA = 1 << 1
DM_LOG_DISCARD = 1 << 2
DM_LOG_MARK = 1 << 3
DM_SECTOR = 512


def export_dm_log_writes(wlog: WriteLog, out: Path | str) -> int:
    """Write `wlog` as a dm-log-writes log device image; returns the number of entries.

    Ordered as dm-log-writes orders them: a write at its completion, a flush at
    its start (so the writes before it are exactly those completed when it began).
    Only successful requests are exported — in-flight ones never reached the log
    device either.
    """
    if not wlog.header.flags & LogFlags.DATA:
        raise JournalError(
            f"write log {wlog.path} was recorded without data; dm-log-writes needs it — "
            "record with log-data=on"
        )
    events: list[tuple[int, Request]] = []
    for r in wlog.requests:
        if not r.completed_ok or r.complete_index is None:
            continue
        if r.op == Op.FLUSH:
            events.append((r.submit_index, r))
        else:
            if r.offset % DM_SECTOR or r.length % DM_SECTOR:
                raise JournalError(
                    f"request {r.seq} ({r.offset}+{r.length}) is not 512-byte aligned; "
                    "dm-log-writes cannot describe it"
                )
            events.append((r.complete_index, r))
    events.sort(key=lambda e: e[0])
    pad = bytes(DM_SECTOR - DM_LOG_ENTRY.size)
    with open(wlog.path, "rb") as src, open(out, "wb") as dst:
        dst.write(
            DM_LOG_SUPER.pack(DM_LOG_MAGIC, DM_LOG_VERSION, len(events), DM_SECTOR).ljust(
                DM_SECTOR, b"\0"
            )
        )
        for _pos, r in events:
            if r.op == Op.FLUSH:
                dst.write(DM_LOG_ENTRY.pack(0, 0, DM_LOG_FLUSH, 0) + pad)
                continue
            nr = r.length // DM_SECTOR
            flags = DM_LOG_FUA if r.fua else 0
            if r.op == Op.DISCARD:
                dst.write(
                    DM_LOG_ENTRY.pack(r.offset // DM_SECTOR, nr, flags | DM_LOG_DISCARD, 0) + pad
                )
                continue
            dst.write(DM_LOG_ENTRY.pack(r.offset // DM_SECTOR, nr, flags, 0) + pad)
            if r.op == Op.WRITE_ZEROES:
                remaining = r.length
                zeroes = bytes(min(remaining, 1 << 20))
                while remaining:
                    n = min(remaining, len(zeroes))
                    dst.write(zeroes[:n])
                    remaining -= n
            else:
                assert r.data_offset is not None
                src.seek(r.data_offset)
                dst.write(src.read(r.length))
    return len(events)


@dataclass(frozen=True)
class DmLogEntry:
    sector: int
    nr_sectors: int
    flags: int
    data: bytes


def read_dm_log_writes(path: Path | str) -> list[DmLogEntry]:
    """Read a dm-log-writes log the way replay-log does (for tests and `log show`)."""
    with open(path, "rb") as f:
        raw = f.read()
    magic, version, nr, ss = DM_LOG_SUPER.unpack_from(raw)
    if magic != DM_LOG_MAGIC or version != DM_LOG_VERSION:
        raise JournalError(f"{path} is not a dm-log-writes log (magic {magic:#x}, v{version})")
    pos = ss
    entries = []
    for _ in range(nr):
        sector, nsec, flags, _dlen = DM_LOG_ENTRY.unpack_from(raw, pos)
        if not flags and not nsec:
            raise JournalError(f"{path}: malformed entry at byte {pos}")
        pos += ss
        data = b""
        if nsec and not flags & DM_LOG_DISCARD:
            data = raw[pos : pos + nsec * ss]
            pos += nsec * ss
        entries.append(DmLogEntry(sector, nsec, flags, data))
    return entries
