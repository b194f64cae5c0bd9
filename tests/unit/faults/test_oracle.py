"""The durability oracle: contracts that hold, and the negative controls it must catch."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.durability.contract import CacheMode
from harness.durability.cut import apply_cut
from harness.durability.journal import JOURNAL_RECORD, read_journal
from harness.durability.oracle import check

from .conftest import crash
from .stack import Paths, open_stack

S = 512


def _flushed_then_volatile(paths: Paths, mode: str = "writeback", **kw: object) -> None:
    be = open_stack(paths, mode, **kw)  # type: ignore[arg-type]
    be.write(0, b"A" * 4096)
    be.flush()
    be.write(0, b"B" * S)
    be.flush()
    be.write(8192, b"C" * 4096)  # volatile
    crash(be)


@pytest.mark.parametrize("policy", ["lose-all", "keep-all", "random", "prefix", "torn"])
def test_writeback_cut_is_inside_the_contract(paths: Paths, policy: str) -> None:
    _flushed_then_volatile(paths)
    apply_cut(paths.image, paths.journal, policy, 5)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert report.ok, report.violations
    assert report.must >= 8  # sectors 0..7 are pinned by the flushes
    assert report.writes_durable == 2


def test_negative_control_unsafe_loses_flushed_writes(paths: Paths) -> None:
    _flushed_then_volatile(paths, "unsafe")
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert check(paths.image, paths.log, CacheMode.UNSAFE).ok  # unsafe promises nothing
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)  # what the guest believed
    assert not report.ok
    assert report.lost == 8
    first = report.violations[0]
    assert (first.sector, first.kind, first.expected_seq, first.found_seq) == (0, "lost", 3, 0)


def test_negative_control_lying_flush_is_caught_under_writeback(paths: Paths) -> None:
    _flushed_then_volatile(paths, blkdebug="flush:lying-flush")
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert not report.ok and report.lost == 8


def test_negative_control_truncated_journal_is_caught(paths: Paths) -> None:
    _flushed_then_volatile(paths)
    state, _ = read_journal(paths.journal)
    second = state.preimages[1]  # the write of B, made durable by the second flush
    # Keep its pre-image and completion, drop the DURABLE record and everything after.
    os.truncate(paths.journal, second.payload_offset + second.length + JOURNAL_RECORD.size)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert not report.ok
    v = report.violations[0]
    assert (v.sector, v.kind, v.expected_seq, v.found_seq) == (0, "lost", 3, 1)


def test_negative_control_image_edited_behind_the_stacks_back(paths: Paths) -> None:
    _flushed_then_volatile(paths)
    apply_cut(paths.image, paths.journal, "keep-all", 0)
    assert check(paths.image, paths.log, CacheMode.WRITEBACK).ok
    with open(paths.image, "r+b") as f:
        f.seek(3 * S)
        f.write(random.Random(1).randbytes(S))
        f.seek(0)
        f.write(b"A" * S)  # an older version of sector 0
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert (report.lost, report.corrupt) == (1, 1)
    kinds = {(v.sector, v.kind) for v in report.violations}
    assert kinds == {(0, "lost"), (3, "corrupt")}


def test_writethrough_requires_every_completed_write(paths: Paths) -> None:
    be = open_stack(paths, "writethrough")
    be.write(0, b"A" * S)
    be.write(S, b"B" * S)
    crash(be)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert check(paths.image, paths.log, CacheMode.WRITETHROUGH).ok
    # The same log judged against an image where the last write vanished:
    with open(paths.image, "r+b") as f:
        f.seek(S)
        f.write(b"\x5a" * S)
    report = check(paths.image, paths.log, CacheMode.WRITETHROUGH)
    assert report.lost == 1 and report.violations[0].expected_seq == 2


def test_fio_style_random_data_is_identified_by_checksum(paths: Paths) -> None:
    rng = random.Random(9)
    be = open_stack(paths)
    blocks = {}
    for _ in range(40):
        off = rng.randrange(0, 64) * 4096
        data = rng.randbytes(4096)
        be.write(off, data)
        blocks[off] = data
    be.flush()
    for _ in range(20):
        be.write(rng.randrange(0, 64) * 4096, rng.randbytes(4096))
    crash(be)
    apply_cut(paths.image, paths.journal, "random", 3)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert report.ok and report.must > 0 and report.unknown == 0
    # Losing a flushed block is named with the write that should be there.
    off = next(iter(blocks))
    with open(paths.image, "r+b") as f:
        f.seek(off)
        f.write(b"\x5a" * 4096)
    assert check(paths.image, paths.log, CacheMode.WRITEBACK).lost >= 1


def test_check_command_exit_status_and_json(
    paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _flushed_then_volatile(paths, "unsafe")
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert main(["check", str(paths.image), "--log", str(paths.log), "--mode", "unsafe"]) == 0
    assert "inside the contract" in capsys.readouterr().out
    out = tmp_path / "check.json"
    assert (
        main(
            [
                "check",
                str(paths.image),
                "--log",
                str(paths.log),
                "--mode",
                "writeback",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    assert "sector 0: lost" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["lost"] == 8
    assert doc["violations"][0] == {"sector": 0, "kind": "lost", "expected_seq": 3, "found_seq": 0}


def test_first_violations_are_the_lowest_sectors(paths: Paths) -> None:
    be = open_stack(paths, "unsafe")
    be.write(0, b"A" * 8192)
    be.write(0, b"B" * 4096)  # sectors 0..7 written twice: classified in a later pass
    be.flush()
    crash(be)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK, max_violations=2)
    assert report.lost == 16
    assert [v.sector for v in report.violations] == [0, 1]


def test_a_write_in_flight_at_the_cut_is_logged_but_not_counted_as_completed(
    paths: Paths,
) -> None:
    import threading
    import time

    from harness.crash.verdict import OracleObservation
    from harness.durability.writelog import read_log

    be = open_stack(paths, "writethrough", blkdebug="write:delay=1500:sector=8")
    be.write(0, b"A" * S)
    slow = threading.Thread(target=be.write, args=(8 * S, b"B" * S))
    slow.start()
    try:
        # The cut comes while the second write is held below log-writes: its
        # submission is in the log, its completion not yet.
        deadline = time.monotonic() + 10
        while len(read_log(paths.log).requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        report = check(paths.image, paths.log, CacheMode.WRITETHROUGH)
    finally:
        slow.join()
        crash(be)
    assert report.ok
    assert (report.writes, report.writes_completed, report.writes_durable) == (2, 1, 1)
    # What results call "writes acknowledged" is what the guest was told about.
    assert OracleObservation.from_report(report).writes == 1


def test_a_guest_changing_its_buffer_while_the_write_is_in_flight_leaves_no_unknown_sector(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The buffer is the guest's memory (vhost-user maps it), and a guest may redirty a
    # page under writeback: virtio-blk does not ask for stable pages. The write below
    # log-writes happens after the log has checksummed the data; whatever the guest does
    # to its page meanwhile, the image must hold a version the log names.
    be = open_stack(paths, "writeback")
    guest_page = bytearray(b"A" * 4096)
    powerfail = be.node("pf")
    below = powerfail.driver_pwritev

    def guest_redirties_the_page(offset: int, iov: Any, flags: Any) -> None:
        guest_page[100:108] = b"new data"  # sector 0 of the page changes mid-request
        below(offset, iov, flags)

    monkeypatch.setattr(powerfail, "driver_pwritev", guest_redirties_the_page)
    be.write(0, memoryview(guest_page))
    be.flush()
    crash(be)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert report.ok, report.violations  # the image holds the write the log names
    with open(paths.image, "rb") as f:
        assert f.read(4096) == b"A" * 4096  # the data as it was when the write was submitted


def test_a_sector_a_durable_write_covers_only_in_part_may_hold_anything(paths: Paths) -> None:
    # Unaligned requests: one starting and ending inside sectors, one ending inside a sector.
    # A sector a request covers in part holds a mix of old and new bytes, unpredictable
    # sector by sector; the sectors it covers whole must hold it.
    be = open_stack(paths)
    be.write(0, b"A" * 4096)
    be.flush()
    be.write(100, b"B" * 1000)  # sector 0 in part, sector 1 whole, sector 2 in part
    be.write(1536, b"C" * 600)  # sector 3 whole, sector 4 in part
    be.write(2560, b"D" * 513)  # sector 5 whole, one byte of sector 6
    be.flush()
    crash(be)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert report.ok, report.violations
    assert (report.sectors_checked, report.must, report.may) == (8, 4, 4)
    image = bytearray(paths.image.read_bytes())
    for sector in (0, 2, 4, 6):  # in part: any content is the contract's
        image[sector * S : (sector + 1) * S] = os.urandom(S)
    paths.image.write_bytes(image)
    assert check(paths.image, paths.log, CacheMode.WRITEBACK).ok
    for sector in (1, 3, 5):  # whole: the write must be there
        image[sector * S : (sector + 1) * S] = b"A" * S
    paths.image.write_bytes(image)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert [v.sector for v in report.violations] == [1, 3, 5]


def test_every_sector_a_kept_unflushed_write_holds_is_counted_unflushed(paths: Paths) -> None:
    # The lose-all duty check reads this count: a write that completed after the last
    # completed flush, still on the image, is unflushed in each sector it holds (8 here).
    _flushed_then_volatile(paths)
    apply_cut(paths.image, paths.journal, "keep-all", 0)
    report = check(paths.image, paths.log, CacheMode.WRITEBACK)
    assert report.ok and report.unflushed == 8
