"""The oracle as the runner uses it: an unflushed rewrite with unchanged content is not "may".

Under lose-all the verdict fails a cell whose image still holds data newer than
the last durable flush (`may` sectors). A filesystem often rewrites a block in
which some sectors keep their old content; after the cut those sectors hold
exactly what the contract requires, and must count as such.
"""

from __future__ import annotations

from pathlib import Path

from harness.block import open_backend
from harness.block.cache import CacheMode
from harness.crash.session import fault_blockdev
from harness.crash.verdict import Observed, OracleObservation, Verdict, expected_for, judge
from harness.durability.contract import FaultModel
from harness.durability.cut import CutPolicy, apply_cut
from harness.durability.oracle import check
from harness.scenario.model import WorkloadSpec
from harness.workloads.ackrecords import AckRecords
from harness.workloads.filesystem import make_disk

BLOCK = 4096


def _run(tmp_path: Path, rewrite_twice: bool) -> object:
    make_disk(tmp_path / "disk.img", 1 << 20)
    spec = fault_blockdev(tmp_path / "disk.img", tmp_path / "j", tmp_path / "w.log")
    backend = open_backend(spec, cache="writeback")
    backend.write(0, b"\x01" * BLOCK)
    if rewrite_twice:
        backend.write(0, b"\x01" * BLOCK)  # two versions of the same sectors
    backend.flush()
    # Unflushed: the first sector changes, the other seven are rewritten unchanged.
    backend.write(0, b"\x02" * 512 + b"\x01" * (BLOCK - 512))
    backend.write(BLOCK, bytes(BLOCK))  # unflushed, zeroes over zeroes (a fresh image)
    backend.graph.close()
    cut = apply_cut(tmp_path / "disk.img", tmp_path / "j", "lose-all", 1)
    assert cut.writes_reverted == 2
    return check(tmp_path / "disk.img", tmp_path / "w.log", CacheMode.WRITEBACK)


def test_unchanged_sectors_of_a_reverted_rewrite_hold_what_the_contract_requires(
    tmp_path: Path,
) -> None:
    report = _run(tmp_path, rewrite_twice=False)
    assert report.ok and report.may == 0, report.summary()  # type: ignore[attr-defined]


def test_the_same_holds_for_sectors_with_several_versions(tmp_path: Path) -> None:
    report = _run(tmp_path, rewrite_twice=True)
    assert report.ok and report.may == 0, report.summary()  # type: ignore[attr-defined]


def test_data_written_after_the_last_flush_completed_counts_as_unflushed(tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img", 1 << 20)
    spec = fault_blockdev(tmp_path / "disk.img", tmp_path / "j", tmp_path / "w.log")
    backend = open_backend(spec, cache="writeback")
    backend.write(0, b"\x01" * BLOCK)
    backend.flush()
    backend.write(BLOCK, b"\x02" * BLOCK)  # after the flush completed, never flushed
    backend.graph.close()
    apply_cut(tmp_path / "disk.img", tmp_path / "j", "keep-all", 1)  # a model that kept it
    report = check(tmp_path / "disk.img", tmp_path / "w.log", CacheMode.WRITEBACK)
    assert report.may == report.unflushed == BLOCK // 512


def _judge_lose_all(may: int, unflushed: int | None) -> Verdict:
    workload = WorkloadSpec("w", AckRecords(), ("oracle",))
    expected = expected_for(
        CacheMode.WRITEBACK, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, workload
    )
    oracle = OracleObservation(10, 8, 80, 80 - may, may, 0, 0, unflushed=unflushed)
    return judge(expected, Observed(oracle=oracle)).verdict


def test_lose_all_fails_only_on_data_no_flush_could_have_covered() -> None:
    # Writes that completed while the last flush ran may legitimately be on disk.
    assert _judge_lose_all(may=16, unflushed=0) is Verdict.PASS
    assert _judge_lose_all(may=16, unflushed=8) is Verdict.FAIL
    assert _judge_lose_all(may=16, unflushed=None) is Verdict.FAIL  # unknown: may decides
