"""Synthetic runs: real cells from the shipped matrix, judged against made-up observations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.block.cache import CacheMode
from harness.crash.record import cell_result, error_result
from harness.crash.verdict import Observed, OracleObservation, Verdict, expected_for_cell, judge
from harness.report.results import CellResult, RunResults
from harness.scenario.cells import Cell, expand
from harness.scenario.parse import load_scenario
from harness.workloads.ackrecords import AckRecordsCheck, AckRecordsObservation, InvalidRecord
from harness.workloads.filesystem import FsckObservation
from harness.workloads.fio_verify import FioVerifyObservation

ROOT = Path(__file__).parents[3]


def observe(cell: Cell, lose_flushed: bool) -> Observed:
    lost = 24 if lose_flushed else 0
    found = 120 if lose_flushed else 205
    invalid = (InvalidRecord(found + 1, found * 4096, "zero"),)
    return Observed(
        oracle=OracleObservation(
            writes=500,
            writes_durable=420,
            sectors_checked=4000,
            must=4000 - lost,
            may=0,
            lost=lost,
            corrupt=0,
        ),
        fio_verify=FioVerifyObservation(3 if lose_flushed else 0, 8192),
        fsck=FsckObservation(mounted=True, exit_code=0),
        ack_records=AckRecordsObservation(
            acked=200, check=AckRecordsCheck(True, 4096, found * 4096, found, found, 1, invalid)
        ),
        guest_io_errors=0,
    )


def synthetic_results(broken_mode: CacheMode | None = CacheMode.WRITEBACK) -> RunResults:
    """The shipped matrix: unsafe loses flushed data (as it must); `broken_mode` loses it too."""
    cells = expand(load_scenario(ROOT / "scenarios" / "matrix.toml"))
    out: list[CellResult] = []
    for i, cell in enumerate(cells):
        lose = cell.mode in (CacheMode.UNSAFE, broken_mode)
        observed = observe(cell, lose)
        verdict = judge(expected_for_cell(cell), observed)
        out.append(
            cell_result(
                cell,
                verdict,
                observed,
                timings={
                    "boot": 3.0 + i % 3,
                    "workload": 4.0,
                    "cut": 0.2,
                    "recover": 0.8,
                    "reboot": 3.1,
                    "check": 1.5,
                },
                artifacts={
                    "console_log": f"cells/{i}/console.log",
                    "backend_log": f"cells/{i}/backend.log",
                    "write_log": f"cells/{i}/write.log",
                    "journal": f"cells/{i}/journal",
                },
            )
        )
    guest, other = expand(load_scenario(ROOT / "scenarios" / "guest-crash.toml"))[:2]
    out.append(
        error_result(
            guest,
            "guest did not boot within 60 s <console log attached>",
            timings={"boot": 60.0},
            artifacts={"console_log": "cells/x/console.log"},
        )
    )
    out.append(error_result(other, "interrupted", verdict=Verdict.SKIPPED))
    return RunResults(
        cells=tuple(out),
        started="2026-01-01T00:00:00+00:00",
        finished="2026-01-01T00:05:00+00:00",
        command="powercut run scenarios/matrix.toml --out r",
        host={"hostname": "ci", "cores": 2, "accel": "tcg"},
    )


@pytest.fixture
def synthetic() -> Callable[..., RunResults]:
    return synthetic_results
