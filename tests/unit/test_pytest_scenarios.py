"""Scenario cells as pytest items, and the plugin behaving as a plugin: no VM, fake cells.

Each test runs pytest in a subprocess (pytester) whose conftest replaces the
cell run with a fake (no image, no guest): `unsafe` cells fail, the others
pass. Collection, selection (-k, -x, --lf), the failure report, JUnit, the
results directory and pytest-xdist (-n 2) are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[2]

FAKE = """
from harness import pytest_scenarios
from harness.crash.record import error_result
from harness.report.results import Verdict


def fake_run(self, item):
    cell = item.cell
    verdict = Verdict.FAIL if cell.mode.value == "unsafe" else Verdict.PASS
    reason = "fake: flushed data lost" if verdict is Verdict.FAIL else "fake: contract kept"
    return error_result(
        cell,
        reason,
        verdict=verdict,
        timings={"total": 1.0},
        artifacts={"console_log": "cells/x/console.log"},
        reproduce=cell.reproduce_command(),
    )


pytest_scenarios.CellSession.run = fake_run
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: shipped scenarios in scenarios/, their pyproject.toml, a stray TOML."""
    scenarios = pytester.path / "scenarios"
    scenarios.mkdir()
    for name in ("matrix", "guest-crash", "lying-flush"):
        shutil.copy(ROOT / "scenarios" / f"{name}.toml", scenarios)
    (scenarios / "settings.toml").write_text('[tool]\nname = "not a scenario"\n')
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n')
    pytester.makeconftest(FAKE)
    return pytester


def test_collect_only_lists_every_cell_and_nothing_else(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--collect-only", "-q", "scenarios/")
    lines = [line for line in result.outlines if "::" in line]
    assert len(lines) == 10 + 10 + 2, result.stdout.str()
    assert (
        "scenarios/matrix.toml::writeback/host-power-cut.lose-all/fio-verify/after-4s/r0" in lines
    )
    assert not [line for line in lines if "settings.toml" in line or "pyproject" in line]
    assert result.ret == 0


def test_a_file_named_on_the_command_line_is_collected_whatever_its_name(
    project: pytest.Pytester,
) -> None:
    shutil.copy(ROOT / "scenarios" / "guest-crash.toml", project.path / "mine.toml")
    result = project.runpytest_subprocess("--collect-only", "-q", "mine.toml")
    assert sum("::" in line for line in result.outlines) == 10


def test_a_broken_scenario_is_a_collection_error_that_names_the_line(
    project: pytest.Pytester,
) -> None:
    (project.path / "scenarios" / "broken.toml").write_text(
        'modes = ["fast"]\n[[fault]]\nmodel = "host-power-cut"\n'
        '[[workload]]\nkind = "ack-records"\n'
    )
    result = project.runpytest_subprocess("--collect-only", "-q", "scenarios/broken.toml")
    result.stdout.fnmatch_lines(["*broken.toml:1: field 'modes' must be one of*got 'fast'*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_verdicts_are_outcomes_and_a_failure_carries_reason_evidence_and_reproduce(
    project: pytest.Pytester, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    junit = tmp_path / "junit.xml"
    result = project.runpytest_subprocess(
        "scenarios/matrix.toml", "--powercut-out", str(out), f"--junitxml={junit}"
    )
    result.assert_outcomes(passed=8, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*FAIL: fake: flushed data lost*",
            "*evidence:*",
            f"*console_log: {out}/cells/x/console.log*",
            "*reproduce:*",
            "*powercut run *matrix.toml --out results/repro --seed 1 --cell unsafe/*",
            "*pytest scenarios/matrix.toml::unsafe/*",
        ]
    )
    # pytest's own JUnit names each test case by its cell id.
    assert 'name="writeback/host-power-cut.lose-all/fio-verify/after-4s/r0"' in junit.read_text()
    # The results directory, as `powercut run` writes it.
    data = json.loads((out / "results.json").read_text())
    assert len(data["cells"]) == 10 and data["complete"] and len(data["planned"]) == 10
    assert data["scenarios"][0]["name"] == "matrix" and data["scenarios"][0]["sha256"]
    assert {"junit.xml", "report.html", "report.md"} <= {p.name for p in out.iterdir()}
    result.stdout.fnmatch_lines([f"powercut: 10 cells, 8 passed, 2 failed; reports in {out}*"])


def test_k_x_and_last_failed_select_cells(project: pytest.Pytester, tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    k = project.runpytest_subprocess(
        "scenarios/", "-k", "writeback and records", "--powercut-out", out
    )
    k.assert_outcomes(passed=3)  # matrix, guest-crash and lying-flush each have one
    x = project.runpytest_subprocess("scenarios/matrix.toml", "-x", "--powercut-out", out)
    x.assert_outcomes(passed=8, failed=1)
    cached = ["-p", "cacheprovider", "-o", "addopts="]
    project.runpytest_subprocess("scenarios/matrix.toml", *cached, "--powercut-out", out)
    lf = project.runpytest_subprocess(
        "scenarios/matrix.toml", *cached, "--lf", "--powercut-out", out
    )
    lf.assert_outcomes(failed=2)


def test_two_xdist_workers_run_the_cells_and_the_controller_writes_one_results_file(
    project: pytest.Pytester, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    out = tmp_path / "results"
    result = project.runpytest_subprocess(
        "scenarios/matrix.toml", "-n", "2", "--powercut-out", str(out)
    )
    result.assert_outcomes(passed=8, failed=2)
    data = json.loads((out / "results.json").read_text())
    assert len(data["cells"]) == 10 and len(data["planned"]) == 10 and data["complete"]
    assert [c["id"] for c in data["cells"]] == [p["id"] for p in data["planned"]]
    assert (out / "report.html").exists()


def test_markers_are_registered_and_options_documented(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vm
        @pytest.mark.libvirt
        def test_marked():
            pass
        """
    )
    # No markers in any ini file: the plugin registers them.
    result = pytester.runpytest_subprocess("--strict-markers", "-m", "vm", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "Unknown pytest.mark" not in result.stdout.str()
    markers = pytester.runpytest_subprocess("--markers")
    markers.stdout.fnmatch_lines(["*@pytest.mark.vm: boots real QEMU guests*"])
    markers.stdout.fnmatch_lines(["*@pytest.mark.soak: *"])
    helptext = pytester.runpytest_subprocess("--help").stdout.str()
    for option in ("--powercut-out", "--keep-images", "--accel", "--keep-failed", "--soak"):
        assert option in helptext, option
    assert "powercut_scenarios" in helptext
