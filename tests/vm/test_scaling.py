"""Runs that scale, on real guests: two cells at once, cells as pytest items under xdist,
and work directories whose paths hold every character an option string or a command
line could trip on.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness import hygiene
from harness.crash.plan import make_plan
from harness.crash.runner import RunObserver, run_plan
from harness.durability.contract import CacheMode
from harness.report.results import CellResult, load_results
from harness.scenario.cells import Cell

pytestmark = pytest.mark.vm
pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[2]
SCENARIOS = ROOT / "scenarios"
# Every character that has broken a path in an option string or a command line somewhere.
AWKWARD = "a=b,c [d] e'f\"g"


def nothing_runs_under(path: Path) -> None:
    """No process (QEMU, backend, fio) still names a path under `path`."""
    left = hygiene.processes_naming(path)
    assert not left, f"still running: {left}"


class Order(RunObserver):
    def __init__(self) -> None:
        self.events: list[str] = []

    def cell_started(self, index: int, cell: Cell) -> None:
        self.events.append("started")

    def cell_finished(self, index: int, cell: Cell, result: CellResult) -> None:
        self.events.append("finished")


def test_two_cells_run_at_once_and_both_keep_their_contract(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    out = tmp_path / "out"
    plan = make_plan(
        [SCENARIOS / "guest-crash.toml"], out, modes=[CacheMode.WRITEBACK], accel=powercut_accel
    )
    assert len(plan.cells) == 2
    order = Order()
    outcome = run_plan(plan, command="pytest", image=guest_image, observer=order, jobs=2)
    results = load_results(out)
    assert [c.verdict for c in results.cells] == ["pass", "pass"], [c.reason for c in results.cells]
    assert outcome.ok and results.complete
    # Both cells were running before either had its verdict: in parallel, in two workers.
    assert order.events[:2] == ["started", "started"]
    # Passing cells leave no disk image by default (--keep-images failed); logs stay.
    assert not list(out.rglob("*.img"))
    for cell in results.cells:
        assert (out / cell.artifacts["console_log"]).exists()
    nothing_runs_under(out)


def test_a_cell_in_a_results_directory_with_awkward_characters(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    # fio's host-side client, its verify state, the backend's --blockdev and QEMU's
    # options all name files under this directory.
    out = tmp_path / AWKWARD
    plan = make_plan(
        [SCENARIOS / "matrix.toml"],
        out,
        cell="writethrough/host-power-cut.lose-all/fio-verify/after-4s/r0",
        accel=powercut_accel,
    )
    run_plan(plan, command="pytest", image=guest_image)
    result = load_results(out).cells[0]
    # A path the harness mangled is an error (fio cannot find its job or state file, the
    # backend its image, QEMU its socket). The verdict itself is fio's: under heavy load
    # fio's verify has been seen to count a write in flight at the cut as written.
    assert result.verdict != "error", result.reason
    fio = next(c for c in result.checkers if c.name == "fio-verify")
    assert fio.details["blocks_verified"] > 0, fio.details
    oracle = next(c for c in result.checkers if c.name == "oracle")
    assert oracle.verdict == "pass", oracle.reason
    assert (out / result.artifacts["write_log"]).exists()
    nothing_runs_under(out)


@pytest.mark.parametrize("options", [AWKWARD], ids=[f"o={AWKWARD}"])
def test_p(power_cut: Any, options: str) -> None:
    """The `power_cut` fixture's work directory is named after the test id: `=`, `,`, ... ."""
    assert AWKWARD in str(power_cut.workdir)
    result = power_cut.command(
        run="for i in $(seq 20); do echo $i >> log && sync && echo ack $i; done",
        check="cat log",
        mode="writethrough",
    )
    assert result.passed, f"{result.reason} {result.explanation}"
    guest = power_cut.boot(mode="writeback", ext4=True)
    guest.check_output("mount /dev/vda /mnt && echo kept > /mnt/f && sync")
    cut = power_cut(fault="host", policy="lose-all", seed=3)
    assert cut.ok, cut.oracle.summary()
    guest = power_cut.reboot()
    assert guest.check_output("mount /dev/vda /mnt && cat /mnt/f") == "kept\n"


def test_scenario_cells_as_pytest_items_in_two_xdist_workers(
    pytester: pytest.Pytester, powercut_accel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    # pytester moves HOME; keep the real image cache instead of building anew.
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    monkeypatch.setenv(
        "POWERCUT_CACHE", os.environ.get("POWERCUT_CACHE", str(home / ".cache/powercut"))
    )
    (pytester.path / "scenarios").mkdir()
    shutil.copy(SCENARIOS / "guest-crash.toml", pytester.path / "scenarios")
    out = pytester.path / "results"
    result = pytester.runpytest_subprocess(
        "scenarios/guest-crash.toml",
        "-k",
        "writeback",
        "-n",
        "2",
        "--accel",
        powercut_accel.value,
        "--powercut-out",
        str(out),
        "-p",
        "no:cacheprovider",
        timeout=900,
    )
    result.assert_outcomes(passed=2)
    data = json.loads((out / "results.json").read_text())
    assert [c["verdict"] for c in data["cells"]] == ["pass", "pass"]
    assert data["complete"] and len(data["planned"]) == 2
    assert (out / "report.html").exists() and not list(out.rglob("*.img"))
    nothing_runs_under(out)
