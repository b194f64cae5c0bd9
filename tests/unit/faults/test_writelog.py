"""The log-writes driver, its reader, `powercut log`, and the dm-log-writes export."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from harness.cli import main
from harness.durability.writelog import (
    DM_LOG_DISCARD,
    DM_LOG_FLUSH,
    DM_LOG_FUA,
    LOG_HEADER,
    LOG_MAGIC,
    LOG_RECORD,
    LogFlags,
    LogHeader,
    LogRecordType,
    LogWriter,
    Op,
    ReqFlags,
    export_dm_log_writes,
    read_dm_log_writes,
    read_log,
    whole_sectors,
)
from harness.errors import BackendStoppedError, JournalError

from .concurrent import Schedule
from .conftest import crash
from .stack import Paths, open_stack

S = 512


def test_every_request_is_recorded_with_submit_and_completion(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 4096)
    be.write(4096, b"F" * S, fua=True)
    be.write_zeroes(8192, 4096)
    be.discard(16384, 4096)
    be.flush()
    be.set_write_cache(False)
    crash(be)
    wlog = read_log(paths.log)
    ops = [(r.op, r.offset, r.length, r.fua) for r in wlog.requests]
    assert ops == [
        (Op.WRITE, 0, 4096, False),
        (Op.WRITE, 4096, S, True),
        (Op.WRITE_ZEROES, 8192, 4096, False),
        (Op.DISCARD, 16384, 4096, False),
        (Op.FLUSH, 0, 0, False),
    ]
    for r in wlog.requests:
        assert r.status == 0 and r.complete_index is not None
        assert r.submit_index < r.complete_index
        assert r.complete_ns is not None and r.complete_ns >= r.submit_ns
    first = wlog.requests[0]
    assert first.crcs is not None and list(first.crcs) == [zlib.crc32(b"A" * S)] * 8
    assert first.pre is not None and list(first.pre) == [zlib.crc32(b"\x5a" * S)] * 8
    # Sectors first touched by zeroes/discard still get their initial content recorded.
    assert {first for _i, first, _c in wlog.preimages} == {16, 32}


def test_data_is_recorded_only_when_asked(paths: Paths) -> None:
    be = open_stack(paths, log_data=True)
    be.write(S, b"xyz" * S)
    crash(be)
    wlog = read_log(paths.log)
    assert wlog.data(wlog.requests[0]) == b"xyz" * S
    paths.log.unlink()
    be = open_stack(paths)
    be.write(S, b"xyz" * S)
    crash(be)
    wlog = read_log(paths.log)
    with pytest.raises(JournalError, match="log-data=on"):
        wlog.data(wlog.requests[0])


def test_failed_request_is_recorded_with_its_errno(paths: Paths) -> None:
    be = open_stack(paths, blkdebug="write:errno=ENOSPC:once")
    with pytest.raises(BackendStoppedError, match="stopped"):  # werror=enospc stops
        be.write(0, b"A" * S)
    crash(be)
    (req,) = read_log(paths.log).requests
    assert req.status == 28  # ENOSPC


def test_torn_tail_is_ignored_and_the_log_continues(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * S)
    be.write(S, b"B" * S)
    crash(be)
    size = paths.log.stat().st_size
    os.truncate(paths.log, size - 7)
    wlog = read_log(paths.log)
    assert wlog.torn_bytes > 0
    assert wlog.requests[-1].status is None  # its completion was the torn record
    be = open_stack(paths)
    be.write(2 * S, b"C" * S)
    crash(be)
    wlog = read_log(paths.log)
    assert wlog.torn_bytes == 0 and wlog.opens == 2
    assert [r.seq for r in wlog.requests] == [1, 2, 3]


def test_log_with_bad_magic_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"\0" * LOG_HEADER.size)
    with pytest.raises(JournalError, match="not a powercut write log"):
        read_log(bad)


def test_log_of_another_version_is_refused_though_its_header_has_the_right_size(
    tmp_path: Path,
) -> None:
    body = LOG_HEADER.pack(LOG_MAGIC, 99, LOG_HEADER.size, 512, 0, 0, 0)[:-4]
    bad = tmp_path / "v99.log"
    bad.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(JournalError, match="has version 99"):
        read_log(bad)


def test_log_writer_starts_an_empty_file_and_refuses_one_too_short_for_a_header(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.log"
    path.write_bytes(b"")  # an empty file is a new log
    w = LogWriter(path, LogHeader(512, LogFlags.NONE, 0))
    w.append(LogRecordType.MARK, Op.NONE, 0, 0, 0, 0, [b"ok\xff"], time_ns=5)
    w.append(LogRecordType.SUBMIT, Op.FLUSH, 0, 1, 0, 0, time_ns=7)
    w.close()
    w.close()  # a second close closes nothing
    wlog = read_log(path)
    # A label that is not UTF-8 is read with U+FFFD for the bad byte, not refused.
    assert wlog.marks == [(0, "ok\ufffd")]
    (flush,) = wlog.requests
    assert flush.submit_ns == 7 and flush.submit_index == 1
    # Only the header and the two records: nothing torn.
    assert wlog.valid_length == path.stat().st_size and wlog.torn_bytes == 0
    one_byte = tmp_path / "short.log"
    one_byte.write_bytes(b"P")
    with pytest.raises(JournalError, match="too short"):
        LogWriter(one_byte, LogHeader(512, LogFlags.NONE, 0))
    assert one_byte.read_bytes() == b"P"


def test_a_log_is_closed_and_cut_to_its_records_also_on_descriptor_0(tmp_path: Path) -> None:
    # A backend started with stdin closed gets descriptor 0 for its log: a child process,
    # so that this one's stdin is never touched.
    path = tmp_path / "w.log"
    child = f"""
import os
from harness.durability.writelog import LogFlags, LogHeader, LogRecordType, LogWriter, Op
os.close(0)
w = LogWriter({str(path)!r}, LogHeader(512, LogFlags.NONE, 0))
assert w._fd == 0, w._fd
w.append(LogRecordType.OPEN, Op.NONE, 0, 0, 0, 0)
w.close()
"""
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    assert path.stat().st_size == LOG_HEADER.size + LOG_RECORD.size  # padding cut
    # On any other descriptor, in this process, the same.
    other = tmp_path / "o.log"
    w = LogWriter(other, LogHeader(512, LogFlags.NONE, 0))
    w.append(LogRecordType.OPEN, Op.NONE, 0, 0, 0, 0)
    w.close()
    assert other.stat().st_size == LOG_HEADER.size + LOG_RECORD.size


def test_a_header_only_log_reopens_and_a_torn_tail_is_counted_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    LogWriter(path, LogHeader(512, LogFlags.NONE, 0)).close()
    wlog = read_log(path)
    assert (wlog.valid_length, wlog.torn_bytes, wlog.requests) == (LOG_HEADER.size, 0, [])
    with path.open("ab") as f:
        f.write(b"\x01" * 10)  # ten bytes of a record that never finished
    assert read_log(path).torn_bytes == 10
    w = LogWriter(path, LogHeader(512, LogFlags.NONE, 0))  # cuts the torn tail off
    w.append(LogRecordType.SUBMIT, Op.FLUSH, 0, w.next_seq, 0, 0)
    w.close()
    wlog = read_log(path)
    assert [r.seq for r in wlog.requests] == [1] and wlog.torn_bytes == 0


def test_a_version_1_write_with_a_span_crc_has_its_preimage_and_data_after_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.log"
    body = LOG_HEADER.pack(LOG_MAGIC, 1, LOG_HEADER.size, 512, 0, 0, 0)[:-4]
    crcs = struct.pack("<2I", 0x11111111, 0x22222222)
    pre = struct.pack("<2I", 0x33333333, 0x44444444)
    data = b"D" * 1024
    payload = crcs + struct.pack("<I", 0x55555555) + pre + data
    flags = int(ReqFlags.HAS_SPAN_CRC | ReqFlags.HAS_PRE | ReqFlags.HAS_DATA)
    head = LOG_RECORD.pack(0, LogRecordType.SUBMIT, Op.WRITE, flags, 0, len(payload), 1, 0, 1024, 9)
    rec = struct.pack("<I", zlib.crc32(payload, zlib.crc32(head[4:]))) + head[4:] + payload
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)) + rec)
    (req,) = read_log(path).requests
    assert req.span_crc == 0x55555555
    assert list(req.pre or []) == [0x33333333, 0x44444444]
    # The data starts after the 44-byte record header, 8 bytes of CRCs, 4 of span CRC, 8 of pre.
    assert req.data_offset == LOG_HEADER.size + 44 + 20


def test_whole_sectors_of_a_span_inside_one_sector_are_none() -> None:
    assert whole_sectors(100, 10, 512) == (1, 0)
    assert whole_sectors(100, 924, 512) == (1, 1)
    assert whole_sectors(0, 1024, 512) == (0, 2)


def test_dm_log_writes_export_replays_to_the_same_image(paths: Paths, tmp_path: Path) -> None:
    initial = tmp_path / "initial.img"
    shutil.copy(paths.image, initial)
    be = open_stack(paths, log_data=True)
    be.write(0, b"A" * 4096)
    be.flush()
    be.write(4096, b"F" * S, fua=True)
    be.write(S, b"B" * S)
    be.write_zeroes(8192, 4096)
    be.flush()
    crash(be)
    out = tmp_path / "dm.log"
    n = export_dm_log_writes(read_log(paths.log), out)
    entries = read_dm_log_writes(out)
    assert len(entries) == n == 6
    assert [e.flags for e in entries] == [0, DM_LOG_FLUSH, DM_LOG_FUA, 0, 0, DM_LOG_FLUSH]
    # Replay as replay-log does: entry.sector * sectorsize, data follows the entry sector.
    replay = bytearray(initial.read_bytes())
    for e in entries:
        if e.flags & DM_LOG_DISCARD:
            replay[e.sector * S : (e.sector + e.nr_sectors) * S] = bytes(e.nr_sectors * S)
        elif e.nr_sectors:
            replay[e.sector * S : e.sector * S + len(e.data)] = e.data
    assert bytes(replay) == paths.image.read_bytes()
    raw = out.read_bytes()
    magic, version, nr, sectorsize = struct.unpack_from("<QQQI", raw)
    assert (magic, version, nr, sectorsize) == (0x6A736677736872, 1, 6, 512)


def test_export_without_data_says_how_to_record_it(paths: Paths, tmp_path: Path) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * S)
    crash(be)
    with pytest.raises(JournalError, match="log-data=on"):
        export_dm_log_writes(read_log(paths.log), tmp_path / "dm.log")


def test_log_show_and_export_commands(
    paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    be = open_stack(paths, log_data=True)
    be.write(0, b"A" * 4096)
    be.flush()
    crash(be)
    assert main(["log", "show", str(paths.log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["by_op"] == {"write": 1, "flush": 1}
    assert [e["op"] for e in doc["entries"]] == ["write", "flush"]
    assert main(["log", "show", str(paths.log)]) == 0
    assert "write" in capsys.readouterr().out
    out = tmp_path / "dm.log"
    assert main(["log", "export", str(paths.log), "--format", "dm-log-writes", "-o", str(out)]) == 0
    assert len(read_dm_log_writes(out)) == 2


def test_write_cache_state_is_recorded_from_open_and_on_every_switch(paths: Paths) -> None:
    be = open_stack(paths, "writeback")
    be.write(0, b"A" * S)
    be.set_write_cache(False)  # the guest writes wce=0
    be.write(S, b"B" * S)
    crash(be)
    wlog = read_log(paths.log)
    first, second = (r.to_json() for r in wlog.requests)
    assert (first["write_cache"], first["fua"]) == (True, False)
    assert (second["write_cache"], second["fua"]) == (False, True)
    assert [state for _i, state in wlog.write_cache_changes] == [True, False]


def test_dm_log_writes_export_of_concurrent_io_orders_as_the_kernel_logs(tmp_path: Path) -> None:
    """dm-log-writes logs a write when it completes and a flush when it starts; failed and
    unfinished requests never reached its log device."""
    sched = Schedule.new(tmp_path / "rec", sectors=64)
    a = sched.write(0, b"a" * 2 * S)
    z = sched.zeroes(8 * S, 4 * S, fua=True)
    f = sched.flush()  # starts before `a` and `z` complete
    sched.complete(z)
    sched.complete(a)
    d = sched.discard(16 * S, 8 * S)
    sched.complete(f)
    b = sched.write(32 * S, b"b" * S, fua=True)
    failed = sched.write(40 * S, b"x" * S)
    sched.complete(failed, status=5)
    sched.complete(d)
    sched.complete(b)
    sched.write(48 * S, b"w" * S)  # in flight at the end
    sched.flush()  # in flight too
    sched.finish()
    out = tmp_path / "dm.log"
    assert export_dm_log_writes(read_log(sched.log), out) == 5
    entries = read_dm_log_writes(out)
    got = [(e.sector, e.nr_sectors, e.flags, e.data) for e in entries]
    assert got == [
        (0, 0, DM_LOG_FLUSH, b""),  # f, at its start
        (8, 4, DM_LOG_FUA, bytes(4 * S)),  # z, at its completion
        (0, 2, 0, b"a" * 2 * S),
        (16, 8, DM_LOG_DISCARD, b""),
        (32, 1, DM_LOG_FUA, b"b" * S),
    ]

    # Byte for byte as replay-log reads it: the super block, then each entry in a sector of
    # its own (zero padded) followed by its data.
    def sector(*fields: int) -> bytes:
        return struct.pack("<" + "Q" * len(fields[:-1]) + "I", *fields).ljust(S, b"\0")

    def entry(first: int, count: int, flags: int) -> bytes:
        return struct.pack("<QQQQ", first, count, flags, 0).ljust(S, b"\0")

    raw = out.read_bytes()
    assert raw == b"".join(
        [
            sector(0x6A736677736872, 1, 5, S),
            entry(0, 0, DM_LOG_FLUSH),
            entry(8, 4, DM_LOG_FUA) + bytes(4 * S),
            entry(0, 2, 0) + b"a" * 2 * S,
            entry(16, 8, DM_LOG_DISCARD),
            entry(32, 1, DM_LOG_FUA) + b"b" * S,
        ]
    )
    for bad in (struct.pack("<QQ", 0x6A736677736872, 2), struct.pack("<QQ", 7, 1)):
        (tmp_path / "bad.log").write_bytes(bad + raw[16:])
        with pytest.raises(JournalError, match="is not a dm-log-writes log"):
            read_dm_log_writes(tmp_path / "bad.log")


def test_dm_log_writes_cannot_describe_a_write_that_is_not_512_byte_aligned(
    tmp_path: Path,
) -> None:
    for offset, length in ((S, 100), (3, S)):
        sched = Schedule.new(tmp_path / f"r{offset}", sectors=8)
        sched.complete(sched.write(offset, b"u" * length))
        sched.finish()
        with pytest.raises(JournalError, match="is not 512-byte aligned"):
            export_dm_log_writes(read_log(sched.log), tmp_path / "dm.log")


def test_dm_log_writes_export_goes_on_past_a_failed_or_unfinished_request(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path / "rec", sectors=16)
    failed = sched.write(0, b"x" * S)
    sched.write(2 * S, b"w" * S)  # never completes
    good = sched.write(4 * S, b"g" * S)
    sched.complete(failed, status=5)
    sched.complete(good)
    sched.finish()
    out = tmp_path / "dm.log"
    assert export_dm_log_writes(read_log(sched.log), out) == 1
    assert [(e.sector, e.data) for e in read_dm_log_writes(out)] == [(4, b"g" * S)]
