"""`powercut cut`: the five policies, the version chain, determinism, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.durability.cut import CutPolicy, CutResult, apply_cut
from harness.durability.journal import (
    JOURNAL_HEADER,
    DurableReason,
    JournalWriter,
    OpKind,
    read_journal,
)

from .conftest import crash
from .stack import Paths, make_paths, open_stack

S = 512


def _workload(paths: Paths) -> None:
    """Sector 0: A durable, then B and C volatile; sectors 8..15: one volatile 4 KiB write."""
    be = open_stack(paths)
    be.write(0, b"A" * S)
    be.flush()
    be.write(0, b"B" * S)
    be.write(0, b"C" * S)
    be.write(8 * S, bytes(range(256)) * 16)
    crash(be)


def _copy(paths: Paths, tmp: Path, name: str) -> tuple[Path, Path]:
    image, journal = tmp / f"{name}.img", tmp / f"{name}.journal"
    shutil.copy(paths.image, image)
    shutil.copy(paths.journal, journal)
    return image, journal


def _cut_copy(
    tmp: Path, written: bytes, journal: Path, policy: str, seed: int
) -> tuple[CutResult, bytes]:
    """A cut of an image holding `written`, with a copy of `journal`: its result and the image
    it leaves (the journal itself stays as it was, for the next seed)."""
    img, j = tmp / "c.img", tmp / "c.journal"
    img.write_bytes(written)
    shutil.copy(journal, j)
    return apply_cut(img, j, policy, seed), img.read_bytes()


def test_lose_all_reverts_to_the_durable_state(paths: Paths) -> None:
    _workload(paths)
    result = apply_cut(paths.image, paths.journal, "lose-all", 0)
    data = paths.image.read_bytes()
    assert data[:S] == b"A" * S
    assert data[8 * S : 16 * S] == b"\x5a" * (8 * S)
    assert result.writes_durable == 1 and result.writes_reverted == 3


def test_keep_all_changes_nothing(paths: Paths) -> None:
    _workload(paths)
    before = paths.image.read_bytes()
    result = apply_cut(paths.image, paths.journal, "keep-all", 0)
    assert paths.image.read_bytes() == before
    assert result.blocks_restored == 0 and result.writes_kept == 3


@pytest.mark.parametrize("seed", range(12))
def test_losing_a_later_write_restores_the_earlier_one_not_the_base(
    paths: Paths, tmp_path: Path, seed: int
) -> None:
    _workload(paths)
    image, journal = _copy(paths, tmp_path, "r")
    result = apply_cut(image, journal, "random", seed)
    lost = {w.seq for w in result.reverted}
    sector0 = image.read_bytes()[:S]
    if 3 not in lost:
        assert sector0 == b"C" * S
    elif 2 not in lost:
        assert sector0 == b"B" * S  # C lost, B kept: B's data, never A or the base
    else:
        assert sector0 == b"A" * S


@pytest.mark.parametrize("policy", [p.value for p in CutPolicy])
def test_same_seed_gives_the_same_image(paths: Paths, tmp_path: Path, policy: str) -> None:
    _workload(paths)
    a_img, a_j = _copy(paths, tmp_path, "a")
    b_img, b_j = _copy(paths, tmp_path, "b")
    ra = apply_cut(a_img, a_j, policy, 42)
    rb = apply_cut(b_img, b_j, policy, 42)
    assert a_img.read_bytes() == b_img.read_bytes()
    assert ra.reverted == rb.reverted


def test_seeds_explore_different_crash_states(paths: Paths, tmp_path: Path) -> None:
    _workload(paths)
    images = set()
    for seed in range(16):
        img, j = _copy(paths, tmp_path, f"s{seed}")
        apply_cut(img, j, "torn", seed)
        images.add(img.read_bytes())
    assert len(images) > 4


def test_prefix_keeps_writes_in_completion_order(paths: Paths, tmp_path: Path) -> None:
    _workload(paths)
    for seed in range(10):
        img, j = _copy(paths, tmp_path, f"p{seed}")
        result = apply_cut(img, j, "prefix", seed)
        lost = sorted(w.seq for w in result.reverted)
        # The lost writes are a suffix of the volatile ones (seqs 2, 3, 4 in completion order).
        assert lost == list(range(5 - len(lost), 5))


def test_prefix_follows_completion_order_when_writes_complete_out_of_order(
    tmp_path: Path,
) -> None:
    """A journal of concurrent writes: completed 3, 1, 2, and 4 still in flight at the cut."""
    image, journal = tmp_path / "d.img", tmp_path / "d.journal"
    image.write_bytes(b"\x5a" * (8 * S))
    writer = JournalWriter.create(journal, S, 8 * S)
    for seq in (1, 2, 3, 4):  # each write's pre-image, then the write lands on the image
        writer.preimage(seq, OpKind.WRITE, seq * S, b"\x5a" * S)
    for index, seq in enumerate((3, 1, 2), start=1):
        writer.complete(seq, index, failed=False)
    writer.close()
    written = b"\x5a" * S + b"".join(bytes([seq]) * S for seq in (1, 2, 3, 4)) + b"\x5a" * 3 * S
    orders = set()
    for seed in range(40):
        result, data = _cut_copy(tmp_path, written, journal, "prefix", seed)
        kept = tuple(seq for seq in (1, 2, 3, 4) if data[seq * S] == seq)
        lost = {w.seq for w in result.reverted}
        assert set(kept) | lost == {1, 2, 3, 4} and not set(kept) & lost
        # What survives is the first writes to complete: a prefix of 3, 1, 2, then 4.
        assert tuple(sorted(kept)) in {(), (3,), (1, 3), (1, 2, 3), (1, 2, 3, 4)}, seed
        orders.add(kept)
    assert len(orders) >= 4  # the seeds cut at different places
    # The cut may fall before the first write to complete and after the last one in flight.
    assert {(), (1, 2, 3, 4)} <= orders


def test_torn_write_persists_some_sectors_only(paths: Paths, tmp_path: Path) -> None:
    _workload(paths)
    seen_torn = False
    for seed in range(20):
        img, j = _copy(paths, tmp_path, f"t{seed}")
        result = apply_cut(img, j, "torn", seed)
        block = img.read_bytes()[8 * S : 16 * S]
        new = bytes(range(256)) * 16
        for k in range(8):
            assert block[k * S : (k + 1) * S] in (new[k * S : (k + 1) * S], b"\x5a" * S)
        seen_torn |= result.writes_torn > 0
    assert seen_torn


def test_cut_empties_the_journal_unless_asked_not_to(paths: Paths, tmp_path: Path) -> None:
    _workload(paths)
    img, j = _copy(paths, tmp_path, "k")
    apply_cut(img, j, "lose-all", 0, reset=False)
    assert len(read_journal(j)[0].preimages) == 4
    apply_cut(paths.image, paths.journal, "lose-all", 0)
    assert read_journal(paths.journal)[0].preimages == []
    # Emptied, not only hidden behind a new header (whose CRC seed the old records fail).
    assert paths.journal.stat().st_size == JOURNAL_HEADER.size == 40


def test_dry_run_changes_nothing(paths: Paths) -> None:
    _workload(paths)
    before = paths.image.read_bytes(), paths.journal.read_bytes()
    result = apply_cut(paths.image, paths.journal, "lose-all", 0, dry_run=True)
    assert result.blocks_restored == 9  # sector 0 once, sectors 8..15
    assert (paths.image.read_bytes(), paths.journal.read_bytes()) == before


def test_cut_command_prints_and_writes_json(
    paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _workload(paths)
    out = tmp_path / "cut.json"
    status = main(
        [
            "cut",
            str(paths.image),
            "--journal",
            str(paths.journal),
            "--policy",
            "lose-all",
            "--seed",
            "1",
            "--json",
            str(out),
        ]
    )
    assert status == 0
    assert "reverted 3" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["policy"] == "lose-all" and len(report["reverted"]) == 3
    assert paths.image.read_bytes()[:S] == b"A" * S


def test_cut_command_reports_a_missing_journal(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["cut", str(paths.image), "--journal", str(paths.journal) + ".nope", "--policy", "lose-all"]
    )
    assert status == 1
    assert "does not exist" in capsys.readouterr().err


def test_large_request_is_journaled_in_pieces_and_reverted_whole(tmp_path: Path) -> None:
    from harness.block.drivers.powerfail import PREIMAGE_CHUNK

    (tmp_path / "big").mkdir()
    big = make_paths(tmp_path / "big", 3 * PREIMAGE_CHUNK, fill=0x5A)
    be = open_stack(big)
    be.discard(0, 3 * PREIMAGE_CHUNK)
    be.write(0, b"W" * S)
    crash(be)
    state = read_journal(big.journal)[0]
    assert [p.seq for p in state.preimages] == [1, 1, 1, 2]
    result = apply_cut(big.image, big.journal, "lose-all", 0)
    assert result.writes_journaled == 2 and result.writes_reverted == 2
    assert big.image.read_bytes() == b"\x5a" * (3 * PREIMAGE_CHUNK)


def test_random_keeps_some_writes_and_loses_others(paths: Paths, tmp_path: Path) -> None:
    _workload(paths)
    lost_under: dict[int, set[int]] = {2: set(), 3: set(), 4: set()}
    for seed in range(16):
        img, j = _copy(paths, tmp_path, f"r{seed}")
        for w in apply_cut(img, j, "random", seed).reverted:
            lost_under[w.seq].add(seed)
    for seq, seeds in lost_under.items():
        assert 0 < len(seeds) < 16, seq  # each volatile write is lost under some seeds only


def test_lose_all_reports_every_reverted_write_as_journaled(tmp_path: Path) -> None:
    """The whole report of one cut, spelled out: a write in two pre-image records, a write
    clamped at an image end that is not a whole sector, and three versions of sector 0."""
    size = 8 * S + 100
    image, journal = tmp_path / "e.img", tmp_path / "e.journal"
    writer = JournalWriter.create(journal, S, size)
    writer.preimage(1, OpKind.WRITE, 0, b"\x5a" * S)
    writer.complete(1, 1, failed=False)
    writer.durable(1, DurableReason.FLUSH)
    writer.preimage(2, OpKind.WRITE_ZEROES, 2 * S, b"\x5a" * 2 * S)
    writer.preimage(2, OpKind.WRITE_ZEROES, 4 * S, b"\x5a" * S)
    writer.complete(2, 2, failed=False)
    writer.preimage(3, OpKind.WRITE, 7 * S, b"\x5a" * (S + 100))  # still in flight
    writer.preimage(4, OpKind.WRITE, 0, b"A" * S)
    writer.complete(4, 3, failed=False)
    writer.preimage(5, OpKind.WRITE, 0, b"B" * S)
    writer.complete(5, 4, failed=False)
    writer.close()
    image.write_bytes(b"C" * S + b"\x5a" * S + bytes(3 * S) + b"\x5a" * 2 * S + b"T" * (S + 100))
    result = apply_cut(image, journal, "lose-all", 7)
    assert image.read_bytes() == b"A" * S + b"\x5a" * (size - S)
    expected = {
        "image": str(image),
        "journal": str(journal),
        "policy": "lose-all",
        "seed": 7,
        "sector_size": 512,
        "writes_journaled": 5,
        "writes_durable": 1,
        "writes_not_durable": 4,
        "writes_kept": 0,
        "writes_reverted": 4,
        "writes_torn": 0,
        "blocks_restored": 6,  # sector 0 once, 2..4, 7 and the 100-byte tail
        "bytes_restored": 5 * 512 + 100,
        "torn_tail_bytes": 0,
        "dry_run": False,
        "reverted": [
            # seq, offset, length, kind, completion, blocks reverted, blocks in the write
            dict(zip(_REVERTED_FIELDS, (2, 1024, 1536, "write-zeroes", 2, 3, 3), strict=True)),
            dict(zip(_REVERTED_FIELDS, (3, 3584, 612, "write", None, 2, 2), strict=True)),
            dict(zip(_REVERTED_FIELDS, (4, 0, 512, "write", 3, 1, 1), strict=True)),
            dict(zip(_REVERTED_FIELDS, (5, 0, 512, "write", 4, 1, 1), strict=True)),
        ],
    }
    # As cut.json has it: the same text, so an int is not a float.
    assert json.dumps(result.to_json()) == json.dumps(expected)


_REVERTED_FIELDS = (
    "seq",
    "offset",
    "length",
    "kind",
    "completion",
    "blocks_reverted",
    "blocks_total",
)


def test_torn_counts_agree_with_the_sectors_on_the_image(tmp_path: Path) -> None:
    """Three volatile two-sector writes (sectors 0-1, 2-3, 4-5) torn under many seeds: a write
    is kept when both its sectors hold its data, torn with one, reverted with none."""
    journal = tmp_path / "t.journal"
    writer = JournalWriter.create(journal, S, 8 * S)
    for seq in (1, 2, 3):
        writer.preimage(seq, OpKind.WRITE, (seq - 1) * 2 * S, b"\x5a" * 2 * S)
    writer.close()
    written = b"".join(bytes([seq]) * 2 * S for seq in (1, 2, 3)) + b"\x5a" * 2 * S
    seen: dict[int, set[bool]] = {sector: set() for sector in range(6)}
    most_torn = 0
    for seed in range(32):
        result, data = _cut_copy(tmp_path, written, journal, "torn", seed)
        new: dict[int, int] = {}
        for sector in range(6):
            seq = sector // 2 + 1
            here = data[sector * S : (sector + 1) * S]
            assert here in (bytes([seq]) * S, b"\x5a" * S)
            seen[sector].add(here[0] == seq)
            new[seq] = new.get(seq, 0) + (here[0] == seq)
        counts = sorted(new.values())
        assert result.writes_kept == counts.count(2), seed
        assert result.writes_torn == counts.count(1), seed
        assert result.writes_reverted == counts.count(0), seed
        assert {(w.seq, w.blocks_reverted, w.blocks_total) for w in result.reverted} == {
            (seq, 2 - n, 2) for seq, n in new.items() if n < 2
        }, seed
        most_torn = max(most_torn, result.writes_torn)
    assert all(s == {True, False} for s in seen.values())  # every sector kept and lost
    assert most_torn >= 2  # some seed tore two writes at once
