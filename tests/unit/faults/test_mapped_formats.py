"""Format version 2 of the journal and the write log: mapped appends, zero padding,
journals started over in place, and version 1 files still read."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from harness.durability.contract import CacheMode
from harness.durability.cut import apply_cut
from harness.durability.journal import (
    JOURNAL_HEADER,
    JOURNAL_RECORD,
    DurableReason,
    JournalHeader,
    JournalRecordType,
    JournalWriter,
    OpKind,
    compact_journal,
    read_journal,
)
from harness.durability.mapped import MappedAppender, all_zero, last_nonzero
from harness.durability.oracle import check
from harness.durability.writelog import (
    LOG_HEADER,
    LOG_RECORD,
    LogFlags,
    LogHeader,
    Op,
    ReqFlags,
    read_log,
)
from harness.durability.writelog import LogRecordType as LogRecord
from harness.errors import JournalError

from .conftest import crash
from .stack import Paths, open_stack, stack_options

S = 512


def _killed_backend(paths: Paths, body: str) -> None:
    """Run `body` against the stack in a child process that dies without closing anything."""
    script = (
        "import json, os, sys\n"
        "from harness.block import open_backend\n"
        "be = open_backend(json.loads(sys.argv[1]), cache='writeback')\n"
        f"{body}\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(stack_options(paths))], check=True, timeout=60
    )


def test_a_killed_backend_loses_no_record_and_leaves_only_zero_padding(paths: Paths) -> None:
    _killed_backend(paths, "be.write(0, b'A' * 512)\nbe.write(4096, b'B' * 4096)")
    state, data = read_journal(paths.journal)
    size = len(data)
    del data
    assert size > state.valid_length  # the preallocated padding is still there ...
    assert state.torn_bytes == 0  # ... and is not mistaken for a torn record
    assert state.completion == {1: 1, 2: 2}  # no COMPLETE record was held back
    wlog = read_log(paths.log)
    assert wlog.torn_bytes == 0
    assert [r.status for r in wlog.requests] == [0, 0]
    assert check(paths.image, wlog, CacheMode.WRITETHROUGH).ok


def test_a_restarted_backend_cuts_the_padding_and_continues(paths: Paths) -> None:
    _killed_backend(paths, "be.write(0, b'A' * 512)")
    be = open_stack(paths)
    be.write(S, b"B" * S)
    crash(be)
    state, _ = read_journal(paths.journal)
    assert [p.seq for p in state.preimages] == [1, 2]
    assert state.opens == 2 and state.torn_bytes == 0
    assert paths.journal.stat().st_size == state.valid_length  # closed: no padding left
    wlog = read_log(paths.log)
    assert [r.seq for r in wlog.requests] == [1, 2] and wlog.opens == 2
    assert paths.log.stat().st_size == wlog.valid_length


def test_damage_is_still_refused_when_the_journal_ends_in_padding(paths: Paths) -> None:
    _killed_backend(paths, "be.write(0, b'A' * 512)\nbe.write(512, b'B' * 512)")
    data = bytearray(paths.journal.read_bytes())
    data[JOURNAL_HEADER.size + 40] ^= 0xFF  # inside the first pre-image
    paths.journal.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged but good records follow"):
        read_journal(paths.journal)


def test_a_torn_header_in_the_padding_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j"
    w = JournalWriter.create(path, S, 1 << 20)
    w.preimage(1, OpKind.WRITE, 0, b"x" * S)
    w.complete(1, 1, False)
    valid = w.size()
    w.close()
    with open(path, "r+b") as f:
        f.seek(valid)
        f.write(b"\x11\x22\x33\x44\x01")  # a header cut short by a kill
        f.write(bytes(1 << 20))  # and the padding behind it
    t0 = time.monotonic()
    state, _ = read_journal(path)
    assert time.monotonic() - t0 < 5  # the padding is skipped, not probed byte by byte
    assert state.valid_length == valid and state.torn_bytes > 0
    assert state.completion == {1: 1}


def test_journal_started_over_in_place_keeps_its_pages_and_reads_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j"
    w = JournalWriter.create(path, S, 1 << 20)
    for seq in range(1, 50):
        w.preimage(seq, OpKind.WRITE, seq * S, bytes([seq]) * S)
        w.complete(seq, seq, False)
    w.durable(49, 0)  # type: ignore[arg-type]
    capacity = path.stat().st_size
    w.reset(S, 1 << 20)
    w.opened()
    assert path.stat().st_size == capacity  # nothing truncated: the pages are reused
    state, _ = read_journal(path)
    assert state.preimages == [] and state.opens == 1 and state.torn_bytes == 0
    w.preimage(1, OpKind.WRITE, 0, b"n" * S)
    w.close()
    state, data = read_journal(path)
    assert [(p.seq, p.offset) for p in state.preimages] == [(1, 0)]
    p = state.preimages[0]
    assert bytes(data[p.payload_offset : p.payload_offset + S]) == b"n" * S


def test_old_records_behind_a_new_header_never_count(tmp_path: Path) -> None:
    # A crash between the new header and the zeroing of the old records.
    path = tmp_path / "j"
    w = JournalWriter.create(path, S, 1 << 20)
    w.preimage(1, OpKind.WRITE, 0, b"o" * S)
    w.complete(1, 1, False)
    w.close()
    fresh = JournalHeader(S, 1 << 20, time.time_ns() + 1).pack()
    with open(path, "r+b") as f:
        f.write(fresh)
    state, _ = read_journal(path)
    assert state.preimages == [] and state.completion == {}
    assert state.torn_bytes > 0  # the stale records are a torn tail, nothing else


def _v1_record(rtype: int, flags: int, seq: int, a: int, b: int, payload: bytes = b"") -> bytes:
    head = JOURNAL_RECORD.pack(0, rtype, flags, 0, len(payload), seq, a, b)[4:]
    return struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + head + payload


def test_a_version_1_journal_is_read_and_cut(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"N" * 4096)
    path = tmp_path / "d.journal"
    path.write_bytes(
        JournalHeader(S, 4096, 1, version=1).pack()
        + _v1_record(JournalRecordType.OPEN, 0, 0, 1, 1)
        + _v1_record(JournalRecordType.PREIMAGE, int(OpKind.WRITE), 1, 0, S, b"O" * S)
        + _v1_record(JournalRecordType.COMPLETE, 0, 1, 1, 2)
    )
    state, _ = read_journal(path)
    assert state.header.version == 1
    assert [p.seq for p in state.preimages] == [1] and state.completion == {1: 1}
    apply_cut(image, path, "lose-all", 0)
    assert image.read_bytes() == b"O" * S + b"N" * (4096 - S)


def test_a_version_1_log_is_read_with_its_recorded_span_crc(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    body = LOG_HEADER.pack(b"PCWLOG\x00\x01", 1, LOG_HEADER.size, S, int(LogFlags.NONE), 1, 0)
    header = body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))
    data = b"D" * (2 * S)
    crcs = struct.pack("<2I", zlib.crc32(data[:S]), zlib.crc32(data[S:]))
    payload = crcs + struct.pack("<I", 0x12345678)  # a recorded span CRC is taken as is

    def record(rtype: int, op: int, flags: int, seq: int, off: int, ln: int, pl: bytes) -> bytes:
        head = LOG_RECORD.pack(0, rtype, op, flags, 0, len(pl), seq, off, ln, 7)[4:]
        return struct.pack("<I", zlib.crc32(pl, zlib.crc32(head))) + head + pl

    path.write_bytes(
        header
        + record(LogRecord.SUBMIT, Op.WRITE, int(ReqFlags.HAS_SPAN_CRC), 1, 0, 2 * S, payload)
        + record(LogRecord.COMPLETE, Op.NONE, 0, 1, 0, 0, b"")
    )
    wlog = read_log(path)
    assert wlog.header.sector_size == S
    (req,) = wlog.requests
    assert req.span_crc == 0x12345678 and req.status == 0
    assert list(req.crcs or []) == [zlib.crc32(data[:S]), zlib.crc32(data[S:])]


def test_a_new_log_header_says_version_2(tmp_path: Path) -> None:
    from harness.durability.writelog import LogWriter

    w = LogWriter(tmp_path / "w.log", LogHeader(S, LogFlags.NONE, 0))
    w.close()
    assert struct.unpack_from("<H", (tmp_path / "w.log").read_bytes(), 8)[0] == 2


def test_mapped_appender_grows_past_its_first_mapping(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        out = MappedAppender(path, fd, 0)
        chunks = [bytes([i % 251 + 1]) * 5000 for i in range(200)]  # ~1 MB, many doublings
        for c in chunks:
            out.append(c[:8], c[8:])
        out.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(chunks)


def test_zero_tail_helpers() -> None:
    data = b"ab\0\0c" + bytes(100_000)
    assert not all_zero(data, 0) and all_zero(data, 5)
    assert last_nonzero(data, 0) == 5 and last_nonzero(data, 5) == 5


def test_a_failed_preimage_read_frees_its_range_and_journals_nothing(tmp_path: Path) -> None:
    from harness.block import open_backend
    from harness.errors import BlockError

    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 65536)
    journal = tmp_path / "d.journal"
    be = open_backend(
        {
            "driver": "powerfail",
            "node-name": "pf",
            "journal": str(journal),
            "file": {
                "driver": "blkdebug",
                "node-name": "dbg",
                "rules": "read:errno=EIO:once",
                "file": {"driver": "file", "filename": str(image)},
            },
        },
        cache="writeback",
    )
    try:
        with pytest.raises((BlockError, OSError)):
            be.write(0, b"a" * S)
        be.write(0, b"b" * S)  # the same range again: not left locked by the failure
    finally:
        be.graph.close()
    state, _ = read_journal(journal)
    assert [p.seq for p in state.preimages] == [1]
    assert image.read_bytes()[:S] == b"b" * S


def test_compacting_keeps_what_is_owed_with_its_completion_and_failure(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter.create(path, 512, 1 << 20)
    for seq in (1, 2, 3, 4):
        writer.preimage(seq, OpKind.WRITE, seq * 512, bytes([seq]) * 512)
    writer.complete(1, 1, failed=False)
    writer.complete(3, 2, failed=True)
    writer.complete(2, 3, failed=False)
    writer.durable(1, DurableReason.FLUSH)  # write 1 is durable: compaction drops it
    writer.close()
    compact_journal(path)
    state, _ = read_journal(path)
    assert [p.seq for p in state.preimages] == [2, 3, 4]
    assert state.completion == {2: 3, 3: 2} and state.failed == {3}
    assert state.durable_index == 1 and not state.is_durable(2)  # 1 is gone: nothing owed


def test_a_new_journal_replaces_whatever_the_file_held(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"\xee" * 100_000)
    writer = JournalWriter.create(path, 512, 1 << 20)
    writer.preimage(1, OpKind.WRITE, 0, b"a" * 512)
    try:  # read as a crash finds it (no close, which cuts the file to its records)
        state, _ = read_journal(path)
    finally:
        writer.close()
    assert [p.seq for p in state.preimages] == [1] and state.torn_bytes == 0


def test_reopening_a_journal_without_its_header_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(JournalError, match=str(path)):
        JournalWriter.reopen(path, 4096)


def test_a_journal_counts_its_durable_records_per_reason_and_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "j"
    w = JournalWriter.create(path, S, 1 << 20)
    w.opened()
    w.durable(3, DurableReason.FLUSH)
    w.durable(5, DurableReason.HORIZON)
    w.durable(7, DurableReason.FLUSH)
    w.close()
    w.close()  # a second close does nothing (the descriptor is gone)
    state, _ = read_journal(path)
    assert state.durable_index == 7 and state.opens == 1
    assert state.durable_reasons == {"flush": 2, "horizon": 1}


def test_a_journal_is_closed_and_cut_to_its_records_also_on_descriptor_0(tmp_path: Path) -> None:
    # A backend started with stdin closed gets descriptor 0 for its journal: a child
    # process, so that this one's stdin is never touched.
    path = tmp_path / "j"
    created = time.time_ns()
    path.write_bytes(JournalHeader(S, 1 << 20, created).pack())
    child = f"""
import os
from harness.durability.journal import JOURNAL_HEADER, JournalHeader, JournalWriter
os.close(0)
fd = os.open({str(path)!r}, os.O_RDWR)
assert fd == 0, fd
header = JournalHeader({S}, {1 << 20}, {created})
w = JournalWriter({str(path)!r}, fd, JOURNAL_HEADER.size, header)
w.opened()
w.close()
"""
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    assert path.stat().st_size == JOURNAL_HEADER.size + JOURNAL_RECORD.size  # padding cut
    # On any other descriptor, in this process, the same.
    other = tmp_path / "o"
    other.write_bytes(JournalHeader(S, 1 << 20, created).pack())
    fd = os.open(other, os.O_RDWR)
    w = JournalWriter(other, fd, JOURNAL_HEADER.size, JournalHeader(S, 1 << 20, created))
    w.opened()
    w.close()
    assert other.stat().st_size == JOURNAL_HEADER.size + JOURNAL_RECORD.size


def test_an_empty_journal_is_refused_as_shorter_than_its_header(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"")
    with pytest.raises(JournalError, match=r"is 0 bytes, shorter than its header"):
        read_journal(path)


def test_a_journal_header_of_another_size_is_refused_even_at_a_readable_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j"
    # magic, version 2, header size 48 (not 40), sector size, image size, created, reserved
    body = JOURNAL_HEADER.pack(b"PCJRNL\x00\x01", 2, 48, S, 1 << 20, 1, 0, 0)[:-4]
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(JournalError, match="has version 2"):
        read_journal(path)


def test_closing_a_mapped_appender_unmaps_it_and_a_second_close_only_cuts(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        out = MappedAppender(path, fd, 0)
        out.append(b"head", b"payload")
        out.close()
        maps = Path("/proc/self/maps").read_text()
        assert str(path) not in maps
        out.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"headpayload"
