"""Scenario cells as pytest items, and the plugin behaving as a plugin: no VM, fake cells.

Each test runs pytest in a subprocess (pytester) whose conftest replaces the
cell run with a fake (no image, no guest): `unsafe` cells fail, the mode named
by $FAKE_ERROR_MODE errs, the others pass. Collection, selection (-k, -x,
--lf), the failure report, JUnit, the results directory and pytest-xdist
(-n 2) are the real ones. One test runs the real `CellRunner` instead, with
only the image and the accelerator stubbed, to a cell that errs before booting.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import pytest_scenarios
from harness.errors import ScenarioError
from harness.scenario.parse import parse_scenario

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[2]

FAKE = """
import os

from harness import pytest_scenarios
from harness.crash.record import error_result
from harness.report.results import Verdict


def fake_run(self, item):
    cell = item.cell
    verdict = Verdict.FAIL if cell.mode.value == "unsafe" else Verdict.PASS
    reason = "fake: flushed data lost" if verdict is Verdict.FAIL else "fake: contract kept"
    if cell.mode.value == os.environ.get("FAKE_ERROR_MODE"):
        verdict, reason = Verdict.ERROR, "fake: BootError: the guest did not boot"
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


BROKEN = {
    # An array left open: tomllib finds out on the next line.
    "syntax.toml": 'modes = ["writeback"\n[[fault]]\nmodel = "host-power-cut"\n'
    '[[workload]]\nkind = "ack-records"\n',
    # A misspelt table: the file has no [[fault]], so it was skipped as "not a scenario".
    "typo.toml": 'modes = ["writeback"]\n\n[[faults]]\nmodel = "host-power-cut"\n'
    '[[workload]]\nkind = "ack-records"\n',
}


def _powercut_says(path: Path) -> str:
    """What `powercut run FILE` says of a broken scenario (its message, without the prefix)."""
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(path), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.startswith("powercut run: "), result.stderr
    return result.stderr.removeprefix("powercut run: ").strip()


def test_a_broken_scenario_in_a_directory_is_a_collection_error_never_skipped(
    project: pytest.Pytester,
) -> None:
    for name, text in BROKEN.items():
        (project.path / "scenarios" / name).write_text(text)
    expected = {name: _powercut_says(project.path / "scenarios" / name) for name in BROKEN}
    assert expected["syntax.toml"].endswith(
        "syntax.toml:2: not valid TOML: Unclosed array (column 1); "
        "the field before it is 'modes' on line 1"
    )
    assert (
        "typo.toml:3: field 'faults' is unknown here; did you mean [[fault]]?"
        in (expected["typo.toml"])
    )
    for args in (["--collect-only", "-q", "scenarios/"], ["scenarios/"]):
        result = project.runpytest_subprocess(*args)
        out = result.stdout.str()
        assert result.ret == pytest.ExitCode.INTERRUPTED, out
        assert "2 errors" in out
        for name, said in expected.items():
            assert f"ERROR collecting scenarios/{name}" in out
            assert said in out, f"pytest does not say what powercut run says: {said}"
        # The other files are still what they were: settings.toml is no scenario.
        assert "settings.toml" not in out


def test_looks_like_scenario_knows_a_broken_scenario_from_other_toml(tmp_path: Path) -> None:
    cases = {
        "pyproject.toml": ('[project]\nname = "x"\n[tool.ruff]\nline-length = 100\n', False),
        "settings.toml": ('title = "x"\n[owner]\nname = "y"\n', False),
        "broken-other.toml": ('[tool\nname = "x"\n', False),
        "matrix.toml": ((ROOT / "scenarios" / "matrix.toml").read_text(), True),
        "modes-only.toml": ('modes = ["writeback"]\n', True),
        "typo.toml": (BROKEN["typo.toml"].replace("[[workload]]", "[[Workloads]]"), True),
        "syntax.toml": (BROKEN["syntax.toml"], True),
        "binary.toml": (bytes(range(256)), False),
        "latin1.toml": ('[[fault]]\nmodel = "h\xf6st"\n'.encode("latin-1"), True),
        "x.scenario.toml": ("", True),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        assert pytest_scenarios.looks_like_scenario(tmp_path / name) is expected, name


def test_the_fields_that_mark_a_scenario_are_the_parsers() -> None:
    with pytest.raises(ScenarioError) as info:
        text = (ROOT / "scenarios" / "matrix.toml").read_text()
        parse_scenario("not-a-field = 1\n" + text, "s.toml")
    valid = str(info.value).split("valid fields: ", 1)[1].split(";")[0].split(", ")
    assert set(pytest_scenarios.SCENARIO_FIELDS) <= set(valid)


def test_a_cell_that_errs_fails_its_test_and_is_recorded_as_an_error(
    project: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ERROR_MODE", "writethrough")
    out = tmp_path / "results"
    junit = tmp_path / "junit.xml"
    result = project.runpytest_subprocess(
        "scenarios/matrix.toml", "--powercut-out", str(out), f"--junitxml={junit}"
    )
    result.assert_outcomes(passed=6, failed=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*ERROR: fake: BootError: the guest did not boot*",
            "FAILED scenarios/matrix.toml::writethrough/*",
        ]
    )
    verdicts = [c["verdict"] for c in json.loads((out / "results.json").read_text())["cells"]]
    assert sorted(verdicts) == ["error"] * 2 + ["fail"] * 2 + ["pass"] * 6
    assert 'failures="4"' in junit.read_text()


REAL_RUNNER = """
from harness import pytest_scenarios
from harness.vm.spec import Accel


def prepare(self, session):
    # No image build and no KVM probe; everything from here on is the real cell run.
    self.images = lambda cell: None
    self.accel = Accel.TCG
    self.prepared = True


pytest_scenarios.CellSession._prepare = prepare
"""


def test_a_cell_that_errs_in_the_real_runner_fails_its_test(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    # fio-verify cut by a count is refused by CellRunner before anything boots: a real
    # error verdict from the real runner, recorder and report, with no VM.
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n')
    pytester.makeconftest(REAL_RUNNER)
    (pytester.path / "refused.toml").write_text(
        'modes = ["writeback", "writethrough"]\n[[fault]]\nmodel = "host-power-cut"\n'
        '[[workload]]\nkind = "fio-verify"\n[cut]\nafter-flushes = 3\n'
    )
    out = tmp_path / "results"
    result = pytester.runpytest_subprocess("refused.toml", "--powercut-out", str(out))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*ERROR: ConfigError: fio-verify cells cut by time*"])
    data = json.loads((out / "results.json").read_text())
    assert [c["verdict"] for c in data["cells"]] == ["error", "error"] and data["complete"]
    result.stdout.fnmatch_lines(["powercut: 2 cells, 0 passed, 2 error; reports in *"])


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
