"""The verdict on real evidence: the block stack, a powerfail cut and the oracle, no VM.

The graph is the one the runner builds: log-writes (what the guest was told)
over [blkdebug over] powerfail (what the host may lose) over a file. A
workload of flushed and unflushed writes runs through it in one cache mode,
the power cut is applied offline, the oracle checks the image against the
mode the verdict names, and the verdict must come out as the issue's matrix
says it must.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.block import open_backend
from harness.block.cache import CacheMode
from harness.crash.verdict import Observed, OracleObservation, Verdict, expected_for, judge
from harness.durability.contract import FaultModel
from harness.durability.cut import CutPolicy, apply_cut
from harness.durability.oracle import check
from harness.scenario.model import Expectation, WorkloadSpec
from harness.workloads.ackrecords import AckRecords

BLOCK = 4096
WORKLOAD = WorkloadSpec("blocks", AckRecords(), ("oracle",))


def run_and_cut(
    tmp: Path, mode: CacheMode, policy: CutPolicy, *, lying_flush: bool = False, seed: int = 3
) -> tuple[Any, Any]:
    image, journal, wlog = tmp / "d.img", tmp / "d.img.journal", tmp / "w.log"
    with open(image, "wb") as f:
        f.write(b"\x5a" * (64 * BLOCK))
    leaf: dict[str, Any] = {
        "driver": "powerfail",
        "journal": str(journal),
        "file": {"driver": "file", "filename": str(image)},
    }
    if lying_flush:
        leaf = {"driver": "blkdebug", "rules": "flush:lying-flush", "file": leaf}
    backend = open_backend(
        {"driver": "log-writes", "log": str(wlog), "file": leaf}, cache=mode.value
    )
    for i in range(16):  # flushed: 16 blocks, one flush every 4
        backend.write(i * BLOCK, bytes([i + 1]) * BLOCK)
        if i % 4 == 3:
            backend.flush()
    for i in range(16, 24):  # completed, never flushed
        backend.write(i * BLOCK, bytes([i + 1]) * BLOCK)
    backend.graph.close()  # a power cut: no final flush
    cut = apply_cut(image, journal, policy.value, seed)
    return cut, wlog


def verdict_for(
    tmp: Path,
    mode: CacheMode,
    policy: CutPolicy,
    expect: Expectation = Expectation.CONTRACT,
    **kw: Any,
) -> tuple[Verdict, str, OracleObservation]:
    expected = expected_for(mode, FaultModel.HOST_POWER_CUT, policy, WORKLOAD, expect=expect)
    _, wlog = run_and_cut(tmp, mode, policy, **kw)
    report = check(tmp / "d.img", wlog, expected.reference)
    observed = OracleObservation.from_report(report)
    v = judge(expected, Observed(oracle=observed))
    return v.verdict, v.reason, observed


@pytest.mark.parametrize("mode", list(CacheMode))
@pytest.mark.parametrize("policy", list(CutPolicy))
def test_the_matrix_holds_on_the_real_stack(
    tmp_path: Path, mode: CacheMode, policy: CutPolicy
) -> None:
    verdict, reason, observed = verdict_for(tmp_path, mode, policy)
    assert verdict is Verdict.PASS, reason
    if mode is CacheMode.UNSAFE and policy is CutPolicy.LOSE_ALL:
        assert reason.startswith("loss detected as expected by oracle") and observed.lost > 0
    if mode in (CacheMode.WRITEBACK, CacheMode.NONE) and policy is CutPolicy.LOSE_ALL:
        # some unflushed writes were lost: the model did its job, and the verdict says so
        assert observed.may == 0 and "lose-all reverted all" in reason


def test_writethrough_keeps_every_completed_write(tmp_path: Path) -> None:
    verdict, _, observed = verdict_for(tmp_path, CacheMode.WRITETHROUGH, CutPolicy.LOSE_ALL)
    assert verdict is Verdict.PASS and observed.writes_durable == observed.writes == 24


def test_lying_flush_under_writeback_is_detected(tmp_path: Path) -> None:
    verdict, reason, observed = verdict_for(
        tmp_path, CacheMode.WRITEBACK, CutPolicy.LOSE_ALL, Expectation.VIOLATION, lying_flush=True
    )
    assert verdict is Verdict.PASS and observed.lost > 0, reason


def test_lying_flush_fails_a_contract_cell(tmp_path: Path) -> None:
    verdict, reason, _ = verdict_for(
        tmp_path, CacheMode.WRITEBACK, CutPolicy.LOSE_ALL, lying_flush=True
    )
    assert verdict is Verdict.FAIL and reason.startswith("oracle: ")


def test_an_honest_disk_fails_the_negative_control(tmp_path: Path) -> None:
    verdict, reason, _ = verdict_for(
        tmp_path, CacheMode.WRITEBACK, CutPolicy.LOSE_ALL, Expectation.VIOLATION
    )
    assert verdict is Verdict.FAIL and "no checker saw any" in reason
