"""The powerfail driver and its journal, through the real block stack."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.block import open_backend
from harness.block.drivers import powerfail
from harness.durability.contract import CacheMode
from harness.durability.cut import apply_cut
from harness.durability.journal import JOURNAL_HEADER, JournalWriter, OpKind, read_journal
from harness.errors import BlockError, JournalError

from .conftest import crash
from .stack import Paths, open_stack, stack_options


def _journal(paths: Paths):  # type: ignore[no-untyped-def]
    state, data = read_journal(paths.journal)
    return state, bytes(data)


def test_preimage_of_every_write_is_journaled_before_the_image_changes(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 4096)
    be.write(1024, b"B" * 512)
    crash(be)
    state, data = _journal(paths)
    assert [(p.offset, p.length) for p in state.preimages] == [(0, 4096), (1024, 512)]
    first, second = state.preimages
    assert data[first.payload_offset : first.payload_offset + 4096] == b"\x5a" * 4096
    # The second pre-image is the first write's data: that is what makes a partial cut exact.
    assert data[second.payload_offset : second.payload_offset + 512] == b"A" * 512
    assert state.completion == {1: 1, 2: 2}
    assert state.durable_index == 0


def test_flush_makes_durable_exactly_the_writes_completed_before_it(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 65536)
    journal = tmp_path / "d.journal"
    # blkdebug below powerfail holds one write in flight while a flush runs.
    be = open_backend(
        {
            "driver": "powerfail",
            "node-name": "pf",
            "journal": str(journal),
            "file": {
                "driver": "blkdebug",
                "node-name": "dbg",
                "rules": "write:delay=400:sector=8",
                "file": {"driver": "file", "filename": str(image)},
            },
        },
        cache="writeback",
    )
    pf = be.node("pf")
    try:
        be.write(0, b"a" * 512)
        slow = threading.Thread(target=be.write, args=(4096, b"s" * 512))
        slow.start()
        deadline = time.monotonic() + 10
        while not pf._inflight and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.005)
        assert pf._inflight  # type: ignore[attr-defined]
        be.flush()
        slow.join()
    finally:
        crash(be)
    state, _ = read_journal(journal)
    assert state.is_durable(1)
    assert not state.is_durable(2), "a write in flight when the flush started stays volatile"
    apply_cut(image, journal, "lose-all", 0)
    data = image.read_bytes()
    assert data[:512] == b"a" * 512
    assert data[4096:4608] == b"\0" * 512


def test_unsafe_flushes_never_make_anything_durable(paths: Paths) -> None:
    be = open_stack(paths, "unsafe")
    be.write(0, b"A" * 512)
    be.flush()
    be.write(512, b"B" * 512, fua=True)
    crash(be)
    state, _ = read_journal(paths.journal)
    assert state.durable_index == 0
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert paths.image.read_bytes()[:1024] == b"\x5a" * 1024


def test_fua_write_is_durable_when_it_completes(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 512)
    be.write(512, b"F" * 512, fua=True)
    be.write(1024, b"C" * 512)
    crash(be)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    data = paths.image.read_bytes()
    # FUA is emulated by a flush, which also covers the write completed before it.
    assert data[:1536] == b"A" * 512 + b"F" * 512 + b"\x5a" * 512


def test_writeback_horizon_makes_old_writes_durable_on_its_own(paths: Paths) -> None:
    be = open_stack(paths, powerfail={"writeback-horizon": 0.05})
    pf = be.node("pf")
    try:
        be.write(0, b"A" * 512)
        deadline = time.monotonic() + 10
        while pf.durable_index < 1 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
    finally:
        crash(be)
    state, _ = read_journal(paths.journal)
    assert state.is_durable(1)
    assert state.durable_reasons == {"horizon": 1}


def test_journal_is_emptied_when_a_durable_flush_leaves_nothing_owed(paths: Paths) -> None:
    be = open_stack(paths, powerfail={"journal-compact": 0})
    be.write(0, b"A" * 4096)
    be.flush()
    crash(be)
    state, _ = read_journal(paths.journal)
    assert state.preimages == []
    assert state.valid_length < JOURNAL_HEADER.size + 100


def test_torn_tail_is_ignored_and_cut_off_when_reopened(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 512)
    be.write(512, b"B" * 512)
    crash(be)
    full = paths.journal.stat().st_size
    with open(paths.journal, "r+b") as f:
        f.truncate(full - 10)  # the last record (the second COMPLETE) torn
    state, _ = read_journal(paths.journal)
    assert state.torn_bytes > 0
    assert len(state.preimages) == 2 and 2 not in state.completion
    be = open_stack(paths)  # a restarted backend continues the journal
    be.write(1024, b"C" * 512)
    crash(be)
    state, _ = read_journal(paths.journal)
    assert state.torn_bytes == 0
    assert [p.seq for p in state.preimages] == [1, 2, 3]
    assert set(state.completion) == {1, 2, 3} and 2 in state.failed
    assert state.opens == 2


def test_damage_inside_the_journal_is_refused(paths: Paths) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 512)
    be.write(512, b"B" * 512)
    crash(be)
    data = bytearray(paths.journal.read_bytes())
    data[JOURNAL_HEADER.size + 40] ^= 0xFF  # inside the first pre-image
    paths.journal.write_bytes(bytes(data))
    # The refusal names the journal: a run reads several (one per disk).
    with pytest.raises(JournalError, match="damaged but good records follow") as refused:
        read_journal(paths.journal)
    assert str(refused.value).startswith(f"journal {paths.journal}: record at byte ")


def test_journal_of_another_image_is_refused(paths: Paths, tmp_path: Path) -> None:
    be = open_stack(paths)
    be.write(0, b"A" * 512)
    crash(be)
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    with pytest.raises(JournalError, match="belongs to an image of"):
        apply_cut(other, paths.journal, "lose-all", 0)


def test_powerfail_is_configured_by_the_dotted_blockdev_form(paths: Paths) -> None:
    spec = (
        f"driver=log-writes,log={paths.log},file.driver=powerfail,"
        f"file.journal={paths.journal},file.sector-size=4k,"
        f"file.file.driver=file,file.file.filename={paths.image}"
    )
    be = open_backend(spec, cache="none")
    try:
        be.write(0, b"Q" * 4096)
        pf = next(n for n in be.graph.nodes.values() if n.driver == "powerfail")
        assert pf.granularity == 4096  # type: ignore[attr-defined]
        assert be.read(0, 4096) == b"Q" * 4096
    finally:
        crash(be)
    state, _ = read_journal(paths.journal)
    assert state.header.sector_size == 4096


def test_writes_of_a_killed_backend_become_durable_at_the_next_flush(paths: Paths) -> None:
    script = (
        "import json, os, sys\n"
        "from harness.block import open_backend\n"
        "be = open_backend(json.loads(sys.argv[1]), cache='writeback')\n"
        "be.write(0, b'A' * 512)\n"
        "be.write(512, b'B' * 512)\n"
        "os._exit(0)  # dies without closing anything\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(stack_options(paths))], check=True, timeout=60
    )
    state, _ = read_journal(paths.journal)
    assert len(state.preimages) == 2
    assert state.durable_index == 0
    be = open_stack(paths)  # the restarted backend
    be.flush()
    crash(be)
    state, _ = read_journal(paths.journal)
    assert state.is_durable(1) and state.is_durable(2)
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert paths.image.read_bytes()[:1024] == b"A" * 512 + b"B" * 512


def test_journal_stays_small_while_writes_are_always_in_flight(paths: Paths) -> None:
    from harness.durability.oracle import check

    spec = stack_options(paths, powerfail={"journal-compact": 8192})
    pf_opts = spec["file"]
    # A blkdebug below powerfail keeps one write in flight across many flushes.
    pf_opts["file"] = {
        "driver": "blkdebug",
        "node-name": "dbg",
        "rules": "write:delay=2000:sector=200",
        "file": pf_opts["file"],
    }
    be = open_backend(spec, cache="writeback")
    pf = be.node("pf")
    try:
        slow = threading.Thread(target=be.write, args=(200 * 512, b"S" * 512))
        slow.start()
        deadline = time.monotonic() + 10
        while not pf._inflight and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.005)
        sizes = []
        for i in range(40):
            be.write((i % 20) * 4096, bytes([i + 1]) * 4096)
            be.flush()
            sizes.append(paths.journal.stat().st_size)
        assert pf._inflight  # type: ignore[attr-defined]
        slow.join()
    finally:
        crash(be)
    assert max(sizes) < 40 * 4096 // 2, sizes  # rewritten, not grown by every write
    state, _ = read_journal(paths.journal)
    seqs = {p.seq for p in state.preimages}
    assert 1 in seqs and len(seqs) <= 3, seqs  # the slow write, and at most the last two
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    data = paths.image.read_bytes()
    assert data[200 * 512 : 201 * 512] == b"\x5a" * 512
    assert check(paths.image, paths.log, CacheMode.WRITEBACK).ok


def test_a_flush_while_a_large_write_takes_its_preimage_keeps_it_revertible(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write taking its pre-image in pieces is owed from the first piece on.

    A flush that lands between the pieces, with nothing else owed, must not
    start the journal over and drop the pieces already taken: the cut could
    no longer lose that write.
    """
    monkeypatch.setattr(powerfail, "PREIMAGE_CHUNK", 4096)
    before = paths.image.read_bytes()
    be = open_stack(paths, powerfail={"journal-compact": 0})
    pf = be.node("pf")
    child = pf.child  # type: ignore[attr-defined]
    reads = []
    real_preadv = child.preadv

    def preadv(offset: int, iov: Any) -> None:
        reads.append(offset)
        real_preadv(offset, iov)
        if offset == 4096:  # the big write's second piece: its first is in the journal
            pf.driver_flush()  # type: ignore[attr-defined]

    try:
        be.write(65536, b"A" * 512)  # completed, not yet durable: the flush has work to do
        child.preadv = preadv
        be.write(0, b"B" * 16384)
        child.preadv = real_preadv
    finally:
        crash(be)
    assert 4096 in reads, reads
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    data = paths.image.read_bytes()
    kept = [i for i in range(0, 16384, 4096) if data[i : i + 4096] != before[i : i + 4096]]
    assert not kept, f"pieces of the large write survived a lose-all cut at {kept}"
    assert data[65536:66048] == b"A" * 512  # made durable by the flush


def test_a_large_write_whose_preimage_cannot_be_read_is_owed_no_longer(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its pieces taken so far complete as failed (nothing was applied), so a flush settles them."""
    monkeypatch.setattr(powerfail, "PREIMAGE_CHUNK", 4096)
    be = open_stack(paths, powerfail={"journal-compact": 0})
    pf = be.node("pf")
    child = pf.child  # type: ignore[attr-defined]
    real_preadv = child.preadv

    def preadv(offset: int, iov: Any) -> None:
        if offset == 4096:
            raise OSError(5, "Input/output error")
        real_preadv(offset, iov)

    try:
        child.preadv = preadv
        with pytest.raises(BlockError, match="Input/output error"):
            be.write(0, b"B" * 16384)
        child.preadv = real_preadv
        assert not pf._inflight  # type: ignore[attr-defined]
        be.flush()
        assert pf.durable_index == pf.completed_index == 1  # type: ignore[attr-defined]
    finally:
        crash(be)
    state, _ = read_journal(paths.journal)
    assert state.preimages == []  # nothing owed: the durable flush started the journal over


def _journal_of(tmp_path: Path, records: list[str]) -> tuple[bytes, list[int]]:
    """A journal (no padding after its last record) and where each record starts."""
    path = tmp_path / "j"
    writer = JournalWriter.create(path, 512, 1 << 20)
    starts = []
    for i, kind in enumerate(records, start=1):
        starts.append(writer.size())
        if kind == "preimage":
            writer.preimage(i, OpKind.WRITE, i * 512, bytes([i]) * 512)
        else:
            writer.complete(1, i, failed=False)
    end = writer.size()
    writer.close()
    return path.read_bytes()[:end], starts


@pytest.mark.parametrize(
    ("records", "damaged"),
    [
        (["preimage", "preimage"], 0),  # a record with a payload follows, last in the file
        (["preimage", "preimage", "complete"], 1),  # one without, ending the file exactly
        (["preimage", "complete", "complete"], 0),
    ],
)
def test_any_good_record_after_a_damaged_one_is_found(
    tmp_path: Path, records: list[str], damaged: int
) -> None:
    data, starts = _journal_of(tmp_path, records)
    bad = bytearray(data)
    bad[starts[damaged] + 40] ^= 0xFF  # inside the record (header or pre-image)
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(
        JournalError, match=f"damaged but good records follow \\(at byte {starts[damaged + 1]}"
    ):
        read_journal(tmp_path / "bad")
    # Damage to the last record alone is a torn tail: the records before it count.
    torn = bytearray(data)
    torn[starts[-1] + 20] ^= 0xFF
    (tmp_path / "torn").write_bytes(bytes(torn))
    state, _ = read_journal(tmp_path / "torn")
    assert state.torn_bytes == len(data) - starts[-1] and state.valid_length == starts[-1]
