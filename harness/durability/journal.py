"""The powerfail undo journal: what the host's volatile storage still owes the disk.

The `powerfail` driver writes through to the image and keeps, in this
journal, the *pre-image* of every write since the last durable flush. A power
cut is then applied offline (`harness.durability.cut`) by putting pre-images back.

Why every write and not only the first write to a block per flush epoch: if
write A and then write B hit the same block and neither is durable, a cut
that loses B but keeps A must restore A's data, not the epoch's base. With a
pre-image per write, every version of a block is recoverable: the data of
write k is the pre-image of the next write to that block (or the image
itself for the last one). This is CrashMonkey's and LazyFS's insight, kept
as an undo log so the image stays a normal, usable image at all times.

Crash safety of the journal itself: records are stored through a shared
mapping of the file (`harness.durability.mapped`), payload first and header last,
and a pre-image is stored before the image is touched; a store is in the host
page cache at once, so a SIGKILLed backend loses no record and leaves at most
one torn record at the tail — the host page cache keeps both files, exactly as
a real host does. Every record, COMPLETE ones included, is there when the call
returns (version 1 held COMPLETE records back to save a system call each; one
lost in a crash made its write look in flight). The reader ignores zero
padding and detects a torn tail by length and CRC; a bad record followed by
good ones is corruption and is refused.

Format, version 2 (version 1 is read too), little-endian:

    file header  JOURNAL_HEADER (40 bytes)
        magic       8s   b"PCJRNL\\0\\1"
        version     u16  2 (1: the previous format, see the end)
        header_size u16  40
        sector_size u32  the undo granularity in bytes (power of two, >= 512)
        image_size  u64  length of the node below powerfail when created
        created_ns  u64  CLOCK_REALTIME when created (or started over)
        reserved    u32  0
        crc32       u32  of the 36 bytes before it

    records, back to back, each  JOURNAL_RECORD header (36 bytes) + payload
        crc32       u32  of the rest of the header and the payload, with the
                         file header's crc32 as the initial value (version 1: 0)
        type        u8   JournalRecordType
        flags       u8   JournalRecordType-specific (PREIMAGE: the OpKind)
        reserved    u16  0
        payload_len u32
        seq         u64  the write's sequence number (PREIMAGE, COMPLETE)
        a           u64  PREIMAGE: byte offset; COMPLETE: completion index;
                         DURABLE: completion index up to which writes are durable;
                         OPEN: process id
        b           u64  PREIMAGE: byte length; COMPLETE/DURABLE/OPEN: CLOCK_MONOTONIC ns

    then zero padding: the writer grows the file ahead of its records; a
    record header of zeroes followed only by zeroes ends the records.

    PREIMAGE  payload = the `b` bytes found at offset `a` before write `seq`
              (aligned to sector_size, clamped to the image end; a large write
              has several, each at most 1 MiB, all before the write starts)
    COMPLETE  write `seq` returned (flags bit 0: it failed); completion
              indexes count 1, 2, 3 ... in completion order
    DURABLE   every write with completion index <= a is durable (flags:
              DurableReason)
    OPEN      a backend opened the journal (the first one, or after a crash)

When nothing is owed the writer starts the journal over in place: a new file
header (one `pwrite(2)`, new created_ns, so a new CRC seed), then the old
records are zeroed. Old records a crash leaves behind the new header fail
their CRC under the new seed: a torn tail, never records of the new journal.
Version 1 files (records seeded with 0, no padding) are read as they are.
"""

from __future__ import annotations

import enum
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.durability.mapped import MappedAppender, all_zero, last_nonzero
from harness.errors import JournalError

# File header; see the module docstring for each field.
JOURNAL_HEADER = struct.Struct("<8sHHIQQII")
# Record header; see the module docstring for each field.
JOURNAL_RECORD = struct.Struct("<IBBHIQQQ")

# JOURNAL_RECORD after its crc32 field: what the CRC covers, packed without slicing.
JOURNAL_RECORD_BODY = struct.Struct("<" + JOURNAL_RECORD.format[2:])

_CRC = struct.Struct("<I")
_pack_crc = _CRC.pack
_pack_body = JOURNAL_RECORD_BODY.pack
_crc32 = zlib.crc32
_monotonic_ns = time.monotonic_ns
_PREIMAGE = 1  # JournalRecordType.PREIMAGE, as a plain int for the per-write path
_COMPLETE = 2  # JournalRecordType.COMPLETE
JOURNAL_MAGIC = b"PCJRNL\x00\x01"
JOURNAL_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 differs only in the zero padding it may end in
COMPLETE_FAILED = 0x01


class JournalRecordType(enum.IntEnum):
    PREIMAGE = 1
    COMPLETE = 2
    DURABLE = 3
    OPEN = 4


class OpKind(enum.IntEnum):
    """What changed the block after its pre-image was taken."""

    WRITE = 0
    WRITE_ZEROES = 1
    DISCARD = 2


class DurableReason(enum.IntEnum):
    FLUSH = 0
    HORIZON = 1  # the writeback horizon passed (host kernel writeback)


@dataclass(frozen=True)
class JournalHeader:
    sector_size: int
    image_size: int
    created_ns: int
    version: int = JOURNAL_VERSION

    def pack(self) -> bytes:
        body = JOURNAL_HEADER.pack(
            JOURNAL_MAGIC,
            self.version,
            JOURNAL_HEADER.size,
            self.sector_size,
            self.image_size,
            self.created_ns,
            0,
            0,
        )[:-4]
        return body + struct.pack("<I", zlib.crc32(body))

    @property
    def record_seed(self) -> int:
        """Initial CRC value of every record (version 2: the header's own CRC).

        Ties records to this header: after the journal is started over in place, the
        old records still in the file beyond the new ones no longer check out.
        """
        if self.version < 2:
            return 0
        return _CRC.unpack_from(self.pack(), JOURNAL_HEADER.size - 4)[0]


@dataclass(frozen=True)
class Preimage:
    seq: int
    kind: OpKind
    offset: int
    length: int
    payload_offset: int  # where the pre-image bytes start in the journal file


@dataclass(frozen=True)
class JournalState:
    """Everything a journal says, in record order."""

    header: JournalHeader
    preimages: list[Preimage]  # in journal order == order applied to the image per block
    completion: dict[int, int]  # seq -> completion index
    failed: frozenset[int]
    durable_index: int  # writes with completion index <= this are durable
    opens: int
    valid_length: int  # bytes up to the end of the last good record
    torn_bytes: int  # bytes after it (a torn tail), ignored
    durable_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def next_seq(self) -> int:
        return max((p.seq for p in self.preimages), default=0) + 1

    @property
    def last_completion(self) -> int:
        return max(self.completion.values(), default=0)

    def is_durable(self, seq: int) -> bool:
        index = self.completion.get(seq)
        return index is not None and index <= self.durable_index


def _parse_header(data: bytes | mmap.mmap, path: Path) -> JournalHeader:
    if len(data) < JOURNAL_HEADER.size:
        raise JournalError(
            f"journal {path} is {len(data)} bytes, shorter than its header; "
            "it is not a powerfail journal (remove it to start a new one)"
        )
    magic, version, header_size, sector_size, image_size, created, _r, crc = (
        JOURNAL_HEADER.unpack_from(data, 0)
    )
    if magic != JOURNAL_MAGIC:
        raise JournalError(f"{path} is not a powerfail journal (bad magic {magic!r})")
    if version not in READABLE_VERSIONS or header_size != JOURNAL_HEADER.size:
        raise JournalError(
            f"journal {path} has version {version}; this powercut reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} — cut it with the powercut that wrote it"
        )
    if zlib.crc32(bytes(data[: JOURNAL_HEADER.size - 4])) != crc:
        raise JournalError(f"journal {path}: header checksum mismatch; the file is damaged")
    return JournalHeader(sector_size, image_size, created, version)


def _records(
    data: bytes | mmap.mmap, path: Path, seed: int
) -> Iterator[tuple[int, tuple[int, ...], int]]:
    """(record offset, header fields, payload offset) for every good record.

    Stops quietly at zero padding or a torn tail; raises if a bad record is followed
    by more data that parses as a good record (that is corruption, not a crash).
    """
    pos = JOURNAL_HEADER.size
    end = len(data)
    unpack = JOURNAL_RECORD.unpack_from
    rsize = JOURNAL_RECORD.size
    while pos + rsize <= end:
        fields = unpack(data, pos)
        payload_len = fields[4]
        stop = pos + rsize + payload_len
        if stop > end or zlib.crc32(data[pos + 4 : stop], seed) != fields[0]:
            if not all_zero(data, pos):
                _refuse_mid_file_damage(data, pos, path, seed)
            return
        yield pos, fields, pos + rsize
        pos = stop


# Where a record header could start: a known type and a zero reserved field.
_CANDIDATE = re.compile(rb"(?s)(?=.{4}[\x01-\x04].\x00\x00)")


def _refuse_mid_file_damage(data: bytes | mmap.mmap, bad: int, path: Path, seed: int) -> None:
    # A torn tail is one partial record (and zero padding). A good record further on
    # means damage inside. Candidates are found by a regex scan, not byte by byte.
    end = len(data)
    limit = min(last_nonzero(data, bad) + JOURNAL_RECORD.size, end, bad + (16 << 20))
    for m in _CANDIDATE.finditer(data, bad + 1, limit):
        probe = m.start()
        if probe + JOURNAL_RECORD.size > end:
            break
        fields = JOURNAL_RECORD.unpack_from(data, probe)
        stop = probe + JOURNAL_RECORD.size + fields[4]
        if stop <= end and zlib.crc32(data[probe + 4 : stop], seed) == fields[0]:
            raise JournalError(
                f"journal {path}: record at byte {bad} is damaged but good records follow "
                f"(at byte {probe}); the journal was modified — it cannot be trusted for a cut"
            )


def read_journal(path: Path | str) -> tuple[JournalState, mmap.mmap | bytes]:
    """Parse a journal; returns its state and the mapped bytes (pre-images point into them)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data: mmap.mmap | bytes = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            )
    except FileNotFoundError:
        raise JournalError(
            f"journal {path} does not exist; pass the journal= of the powerfail node"
        ) from None
    header = _parse_header(data, path)
    preimages: list[Preimage] = []
    completion: dict[int, int] = {}
    failed: set[int] = set()
    durable = 0
    opens = 0
    reasons: dict[str, int] = {}
    valid = JOURNAL_HEADER.size
    for pos, fields, payload in _records(data, path, header.record_seed):
        _crc, rtype, flags, _r, payload_len, seq, a, b = fields
        if rtype == JournalRecordType.PREIMAGE:
            if payload_len != b:
                raise JournalError(f"journal {path}: pre-image at byte {pos} has a bad length")
            preimages.append(Preimage(seq, OpKind(flags & 0x3), a, b, payload))
        elif rtype == JournalRecordType.COMPLETE:
            completion[seq] = a
            if flags & COMPLETE_FAILED:
                failed.add(seq)
        elif rtype == JournalRecordType.DURABLE:
            durable = max(durable, a)
            name = DurableReason(flags).name.lower()
            reasons[name] = reasons.get(name, 0) + 1
        elif rtype == JournalRecordType.OPEN:
            opens += 1
        else:
            raise JournalError(f"journal {path}: unknown record type {rtype} at byte {pos}")
        valid = payload + payload_len
    state = JournalState(
        header,
        preimages,
        completion,
        frozenset(failed),
        durable,
        opens,
        valid,
        0 if all_zero(data, valid) else len(data) - valid,  # zero padding is not torn
        reasons,
    )
    return state, data


class JournalWriter:
    """Appends records through a shared mapping (`harness.durability.mapped`).

    Every record is in the host page cache when the call returns — a killed
    process loses none, and COMPLETE records are no longer held back in memory
    (version 1 deferred them to save a `write(2)` each).
    """

    def __init__(self, path: Path | str, fd: int, size: int, header: JournalHeader) -> None:
        self._fd = fd
        self._seed = header.record_seed
        self._file = MappedAppender(Path(path), fd, size)  # the path names it in errors

    @classmethod
    def create(cls, path: Path | str, sector_size: int, image_size: int) -> JournalWriter:
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        header = JournalHeader(sector_size, image_size, time.time_ns())
        packed = header.pack()
        os.write(fd, packed)
        return cls(path, fd, len(packed), header)

    @classmethod
    def reopen(cls, path: Path | str, valid_length: int) -> JournalWriter:
        """Continue an existing journal, cutting off a torn tail (and padding) first."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            header = _parse_header(os.pread(fd, JOURNAL_HEADER.size, 0), path)
            os.ftruncate(fd, valid_length)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, valid_length, header)

    def _encode(
        self,
        rtype: int,
        flags: int,
        seq: int,
        a: int,
        b: int,
        payload: bytes | bytearray | memoryview = b"",
    ) -> bytes:
        body = _pack_body(rtype, flags, 0, len(payload), seq, a, b)
        return _pack_crc(_crc32(payload, _crc32(body, self._seed))) + body

    def preimage(
        self, seq: int, kind: OpKind | int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        n = len(data)
        body = _pack_body(_PREIMAGE, kind, 0, n, seq, offset, n)
        self._file.append(_pack_crc(_crc32(data, _crc32(body, self._seed))) + body, data)

    def complete(self, seq: int, index: int, failed: bool) -> None:
        body = _pack_body(
            _COMPLETE, COMPLETE_FAILED if failed else 0, 0, 0, seq, index, _monotonic_ns()
        )
        self._file.append(_pack_crc(_crc32(body, self._seed)) + body)

    def durable(self, index: int, reason: DurableReason) -> None:
        self._file.append(
            self._encode(JournalRecordType.DURABLE, int(reason), 0, index, time.monotonic_ns())
        )

    def opened(self) -> None:
        self._file.append(
            self._encode(JournalRecordType.OPEN, 0, 0, os.getpid(), time.monotonic_ns())
        )

    def sync(self) -> None:
        """Nothing to do: every record is in the page cache already (kept for callers)."""

    def size(self) -> int:
        return self._file.size

    def reset(self, sector_size: int, image_size: int) -> None:
        """Drop every record: nothing is owed to the disk any more.

        Started over in place, keeping the file's pages (no page-cache allocation for
        the next records): the new header's CRC seeds every record, so old records
        left beyond the new ones no longer check out, whatever instant a crash hits.
        """
        header = JournalHeader(sector_size, image_size, time.time_ns())
        self._file.restart(header.pack())
        self._seed = header.record_seed

    def close(self) -> None:
        if self._fd >= 0:
            self._file.close()
            os.close(self._fd)
            self._fd = -1


def compact_journal(path: Path | str) -> int:
    """Rewrite a journal without the writes that are already durable; returns its length.

    Safe because durability is a prefix of completion order and overlapping writes
    complete in the order they were applied: for every block, the durable versions
    come first in its chain, and the last of them is the pre-image of the first
    write that is not durable — which is kept. Written to a new file that then
    replaces the old one atomically, so a crash leaves one journal or the other.
    """
    path = Path(path)
    state, data = read_journal(path)
    try:
        keep = [p for p in state.preimages if not state.is_durable(p.seq)]
        kept_seqs = dict.fromkeys(p.seq for p in keep)
        tmp = path.with_name(path.name + ".compact")
        writer = JournalWriter.create(tmp, state.header.sector_size, state.header.image_size)
        try:
            writer.opened()
            # Completion indexes are absolute: the durable mark keeps its meaning.
            writer.durable(state.durable_index, DurableReason.FLUSH)
            for p in keep:
                writer.preimage(
                    p.seq,
                    p.kind,
                    p.offset,
                    memoryview(data)[p.payload_offset : p.payload_offset + p.length],
                )
            for seq in kept_seqs:
                if seq in state.completion:
                    writer.complete(seq, state.completion[seq], seq in state.failed)
            writer.sync()
            length = writer.size()
        finally:
            writer.close()
        os.replace(tmp, path)
    finally:
        if not isinstance(data, bytes):
            data.close()
    return length


def reset_journal(path: Path | str, header: JournalHeader) -> None:
    """Rewrite a journal as empty (after a cut has been applied to its image)."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, JournalHeader(header.sector_size, header.image_size, time.time_ns()).pack())
    finally:
        os.close(fd)
