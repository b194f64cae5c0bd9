"""Your software under test: a real database, a filesystem misconfiguration, four filesystems.

Each test is one cell on real guests (two boots under TCG): what a user of
the `power_cut` fixture or of a scenario file would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scenario_cells import checker, run_scenario_cell

pytestmark = pytest.mark.vm

SQLITE_SETUP = "sqlite3 app.db 'pragma journal_mode=wal; create table t(n integer primary key)'"
SQLITE_CHECK = (
    "test \"$(sqlite3 app.db 'pragma integrity_check')\" = ok && sqlite3 app.db 'select n from t'"
)


def sqlite_run(rows: int, pragma: str = "") -> str:
    insert = f'sqlite3 app.db "{pragma}insert into t values($i)"'
    return f"for i in $(seq {rows}); do {insert} && echo ack $i; done"


def test_your_database_in_three_lines(power_cut: Any) -> None:
    result = power_cut.command(
        run=sqlite_run(40), check=SQLITE_CHECK, setup=SQLITE_SETUP, packages=["sqlite3"]
    )
    assert result.passed, f"{result.reason} {result.explanation}"
    assert result.writes_acknowledged > 0  # the oracle's completed writes
    check = checker(result, "check")
    assert check.verdict == "pass" and len(check.details["acked"]) == 40
    assert check.details["lost"] == [] and check.details["exit_code"] == 0


def test_an_application_that_skips_fsync_is_caught_and_the_report_blames_it(
    power_cut: Any,
) -> None:
    result = power_cut.command(
        run=sqlite_run(40, "pragma synchronous=off; "),
        check=SQLITE_CHECK,
        setup=SQLITE_SETUP,
        packages=["sqlite3"],
        expect="violation",
    )
    assert result.passed and result.reason.startswith("loss detected as expected"), result.reason
    assert checker(result, "oracle").verdict == "pass"
    assert checker(result, "oracle").details["lost"] == 0  # the disk kept its contract
    assert result.explanation.startswith("the disk kept its contract, so the application")


def test_a_run_that_fails_before_the_cut_is_an_error_with_its_stderr(power_cut: Any) -> None:
    result = power_cut.command(run="echo ack 1; echo no space left >&2; exit 3", check="true")
    assert result.verdict == "error"
    assert "exited 3" in result.reason and "no space left" in result.reason


def test_ext4_mounted_nobarrier_loses_fsynced_records_and_the_report_says_why(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "nobarrier.toml",
        "writeback/host-power-cut.lose-all/ack-records/after-exit/r0",
    )
    assert result.passed, result.reason
    assert checker(result, "ack-records").loss_detected
    assert checker(result, "oracle").details["lost"] == 0
    assert "the disk kept its contract" in result.explanation
    assert "the guest sent 0 flushes" in result.explanation, result.explanation


@pytest.mark.parametrize(
    ("fs", "fsck"),
    [("xfs", "xfs_repair -n"), ("btrfs", "btrfs check"), ("f2fs", "fsck.f2fs --dry-run")],
)
def test_fsynced_records_survive_a_host_power_cut_on_each_filesystem(
    tmp_path: Path, guest_image: Any, powercut_accel: Any, fs: str, fsck: str
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "filesystems.toml",
        f"writeback/host-power-cut.lose-all/ack-records@{fs}/after-100-acked/r0",
    )
    assert result.passed, result.reason
    records = checker(result, "ack-records")
    assert records.details["acked"] >= 100 and records.details["check"]["highest_contiguous"] >= 100
    assert checker(result, "fsck").details["command"].startswith(fsck)
