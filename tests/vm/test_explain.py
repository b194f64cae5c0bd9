"""Why it was lost, on real guests: a shipped faulty example explained, its fixed twin clean.

The program is scenarios/programs/replace.pl (write a temporary, fsync it,
rename it over the file, acknowledge), without and with the directory's
fsync after the rename. `power_cut.explore` records it traced (tracefs),
checks the crash states and explains each failing one from the calls: the
rename's directory entry was not synced. `powercut run` does the same for
its one cut (the workload exits, the runner cuts with lose-all: the last
rename is still in the page cache). The fixed twin must have no failing
state, no cause, and nothing at risk at any acknowledgement. Kept short: four
replacements, ext4, one small exploration each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scenario_cells import run_scenario_cell

from harness.explore.causes import Property
from harness.workloads.command import Command

pytestmark = pytest.mark.vm

ROOT = Path(__file__).parents[2]
PROGRAM = ROOT / "scenarios" / "programs" / "replace.pl"
FIX = "fsync the directory /mnt after rename(/mnt/state.tmp, /mnt/state)"


def replace(fixed: bool) -> Command:
    flag = " --fsync-dir" if fixed else ""
    return Command(f"perl /usr/local/bin/replace.pl 4{flag}", "cat state 2>/dev/null; true")


def test_explore_names_the_rename_whose_directory_was_never_fsynced(power_cut: Any) -> None:
    result = power_cut.explore(
        replace(fixed=False),
        expect="violation",
        guest_files={"/usr/local/bin/replace.pl": PROGRAM},
        max_states=30,
        disk_size=64 << 20,
    )
    assert result.passed, result.reason  # the loss is caught
    assert result.record.trace is not None and "traced with" in result.record.trace
    failing = result.failing
    assert failing and all(s.explanation is not None for s in failing)
    (group,) = result.causes
    assert group.relied_on is Property.ENTRY_NOT_SYNCED and group.fix == FIX
    assert len(group.states) == len(failing)
    assert group.replay is not None and "--state" in group.replay
    first = failing[0].explanation
    assert first is not None and first.causes[0].calls[0].name in ("rename", "renameat2")
    # Every acknowledgement had the rename's entry at risk.
    assert len(result.at_risk) == 4
    assert all(any(r.path == "/mnt/state" for r in ack.risks) for ack in result.at_risk)


def test_explore_finds_nothing_to_explain_once_the_directory_is_fsynced(power_cut: Any) -> None:
    result = power_cut.explore(
        replace(fixed=True),
        guest_files={"/usr/local/bin/replace.pl": PROGRAM},
        max_states=30,
        disk_size=64 << 20,
    )
    assert result.passed, result.reason
    assert not result.failing and result.causes == ()
    assert len(result.at_risk) == 4 and all(not ack.risks for ack in result.at_risk)


@pytest.mark.parametrize(
    ("scenario", "cell"),
    [
        ("explain-rename.toml", "writeback/host-power-cut.lose-all/replace@ext4/after-exit/r0"),
        (
            "explain-rename-fixed.toml",
            "writeback/host-power-cut.lose-all/replace-fsync-dir@ext4/after-exit/r0",
        ),
    ],
    ids=["faulty", "fixed"],
)
def test_powercut_run_explains_its_cut_of_the_faulty_program_only(
    tmp_path: Path, guest_image: Any, powercut_accel: Any, scenario: str, cell: str
) -> None:
    result = run_scenario_cell(tmp_path, guest_image, powercut_accel, scenario, cell)
    assert result.verdict == "pass", result.reason
    assert "traced with" in result.trace
    out = tmp_path / "out"
    assert (out / result.artifacts["trace_json"]).exists()
    if "fixed" in scenario:
        assert result.causes is None
        return
    causes = result.causes
    assert causes is not None and causes.lost_tokens == ("12",), causes
    assert [c.relied_on for c in causes.causes] == [Property.ENTRY_NOT_SYNCED]
    assert causes.causes[0].fix == FIX
