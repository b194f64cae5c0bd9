"""Soak: hundreds of host power cuts with acknowledged records; nothing acknowledged is lost.

Off by default (marked soak): `pytest --soak tests/vm/test_soak.py`. Each cut is one
runner cell (boot, ackrecords, host power cut lose-all, oracle, reboot, check) —
`run_plan`, the runner `powercut run` uses, run one cell at a time so that a
time budget can end the soak between cells.

Knobs (environment):
  POWERCUT_SOAK_CUTS     cuts per cache mode (default 200)
  POWERCUT_SOAK_SECONDS  stop starting cells after this many seconds per mode
                         (default: no limit); the achieved count is recorded
  POWERCUT_SOAK_RECORD   a directory: soak-<mode>.json there (counts, losses),
                         rewritten after every cut
Progress: add --log-cli-level=INFO for a line per cut.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from harness.commands.run import add_run_arguments, plan_from_args
from harness.crash.runner import run_plan
from harness.proc import live_processes
from harness.report.results import CellResult

pytestmark = [pytest.mark.vm, pytest.mark.soak]
log = logging.getLogger(__name__)

# One cell per cut: writethrough acknowledges a record once its write completed,
# writeback once fsync returned; a lose-all host power cut must lose neither.
SCENARIO = """\
name = "soak"
description = "Host power cuts (lose-all) with acknowledged records, repeated"
image = "default"
disk-size = "128M"
modes = ["writethrough", "writeback"]
repetitions = 1
seed = {seed}
timeout = 120

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "ack-records"
records = 0
record-size = "4k"
sync = "fsync"
[workload.cut]
after-acked-writes = 100
"""


def _plan(tmp_path: Path, mode: str, cuts: int, accel: Any) -> Any:
    scenario = tmp_path / "soak.toml"
    scenario.write_text(SCENARIO.format(seed=int(os.environ.get("POWERCUT_SOAK_SEED", "1"))))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    out = tmp_path / "out"
    argv = [str(scenario), "--out", str(out), "--mode", mode, "--repeat", str(cuts)]
    args = parser.parse_args([*argv, "--accel", accel.value])
    return plan_from_args(args)


def _checker(result: CellResult, name: str) -> Any:
    return next((c for c in result.checkers if c.name == name), None)


def _reverted(out: Path, result: CellResult) -> int:
    """Writes the cut reverted (cut.json): in flight at the cut, or completed but unflushed."""
    cut_json = result.artifacts.get("cut_json")
    if not cut_json:
        return 0
    return int(json.loads((out / cut_json).read_text())["writes_reverted"])


def _summary(
    mode: str, wanted: int, results: list[CellResult], reverted: list[int], seconds: float
) -> dict[str, Any]:
    """The soak's figures. Records are the application's (ackrecords), writes the disk's."""
    records = [_checker(r, "ack-records") for r in results]
    fsck = [_checker(r, "fsck") for r in results]
    return {
        "mode": mode,
        "cuts_wanted": wanted,
        "cuts_done": len(results),
        "passed": sum(r.passed for r in results),
        "failed": [f"{r.id}: {r.verdict} {r.reason}" for r in results if not r.passed],
        "records_acknowledged": sum(int(c.details.get("acked", 0)) for c in records if c),
        "cuts_losing_a_record": sum(bool(c and c.loss_detected) for c in records),
        "disk_writes_completed": sum(r.writes_acknowledged for r in results),
        # Completed but not yet flushed when the power went: lose-all reverted these
        # (writeback's unflushed writes; writes still in flight are reverted too but
        # were never completed). The contract allows it; the record check proves
        # that none of them held an acknowledged record.
        "disk_writes_unflushed_at_the_cut": sum(
            r.writes_acknowledged - r.writes_durable for r in results
        ),
        "disk_writes_reverted_by_the_cut": sum(reverted),
        "cuts_reverting_a_write": sum(n > 0 for n in reverted),
        "sectors_lost": sum(r.lost for r in results),
        "sectors_corrupt": sum(r.corrupt for r in results),
        "fsck_clean": sum(bool(c and c.verdict == "pass") for c in fsck),
        "seconds": round(seconds, 1),
        "seconds_per_cut": round(seconds / len(results), 1) if results else None,
    }


@pytest.mark.timeout(0)  # bounded by the cut count and POWERCUT_SOAK_SECONDS instead
@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
def test_host_power_cuts_lose_no_acknowledged_record(
    tmp_path: Path, guest_image: Any, powercut_accel: Any, mode: str
) -> None:
    cuts = int(os.environ.get("POWERCUT_SOAK_CUTS", "200"))
    budget = float(os.environ.get("POWERCUT_SOAK_SECONDS", "inf"))
    plan = _plan(tmp_path, mode, cuts, powercut_accel)
    assert len(plan.cells) == cuts
    record = os.environ.get("POWERCUT_SOAK_RECORD")
    results: list[CellResult] = []
    reverted: list[int] = []
    t0 = time.monotonic()
    for index, cell in enumerate(plan.cells):
        if time.monotonic() - t0 > budget:
            break
        one = dataclasses.replace(plan, cells=(cell,), out=plan.out / f"{index:03d}")
        before = set(live_processes())  # session daemons (libvirtd) may already run
        outcome = run_plan(one, command=f"pytest --soak {__file__}", image=guest_image)
        left = set(live_processes()) - before
        assert not left, f"cut {index} left processes behind: {left}"
        results.extend(outcome.results.cells)
        reverted.extend(_reverted(one.out, r) for r in outcome.results.cells)
        summary = _summary(mode, cuts, results, reverted, time.monotonic() - t0)
        # Progress for whoever watches (--log-cli-level=INFO), and a record that
        # survives an interrupted soak.
        log.info(
            "soak %s: %d/%d cuts, %d acknowledged records, %d sectors lost, %d failed",
            mode,
            len(results),
            cuts,
            summary["records_acknowledged"],
            summary["sectors_lost"],
            len(summary["failed"]),
        )
        if record:
            Path(record).mkdir(parents=True, exist_ok=True)
            (Path(record) / f"soak-{mode}.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary = _summary(mode, cuts, results, reverted, time.monotonic() - t0)
    assert results, "the time budget allowed no cut"
    assert summary["sectors_lost"] == 0 and summary["sectors_corrupt"] == 0, summary
    assert summary["cuts_losing_a_record"] == 0, summary
    assert summary["passed"] == len(results), summary
