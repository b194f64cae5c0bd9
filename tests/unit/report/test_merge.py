"""`powercut report --merge`: shards make one run; what would make a wrong report is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from crash import fake_cells  # tests/unit/crash: on sys.path as pytest imports packages

from harness.crash.images import CellImages
from harness.crash.plan import make_plan
from harness.crash.runner import run_plan
from harness.errors import ConfigError
from harness.report.merge import merge_results
from harness.report.render import render_all
from harness.report.results import load_results
from harness.vm.spec import Accel

ROOT = Path(__file__).parents[3]


def shard(tmp_path: Path, name: str, spec: str | None, scenario: str = "matrix") -> Path:
    out = tmp_path / name
    plan = make_plan([scenario], out, accel=Accel.TCG, shard=spec)
    run_plan(
        plan,
        command=f"powercut run {scenario} --shard {spec}",
        images=CellImages(default=fake_cells.image(tmp_path)),
        cell_run=fake_cells.passing,
    )
    return out


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return [shard(tmp_path, f"shard-{k}", f"{k}/3") for k in (1, 2, 3)]


def test_three_shards_merge_into_the_whole_run_in_plan_order(
    tmp_path: Path, shards: list[Path]
) -> None:
    out = tmp_path / "merged"
    merged = merge_results(shards, out)
    render_all(merged, out)
    whole = make_plan(["matrix"], out)
    again = load_results(out)
    assert [c.id for c in again.cells] == [c.id for c in whole.cells]
    assert again.complete and not again.missing and again.shard is None
    assert [c.verdict for c in again.cells].count("fail") == 2  # the fakes fail unsafe
    for cell in again.cells:  # artifact paths now relative to the merged directory
        assert (out / cell.artifacts["console_log"]).exists(), cell.artifacts
    junit = (out / "junit.xml").read_text()
    assert junit.count("<testcase") == 10
    assert {"report.html", "report.md", "results.json", "plots"} <= {p.name for p in out.iterdir()}
    assert again.host["merged_from"] == [str(s) for s in shards]


def test_a_missing_shard_is_named(tmp_path: Path, shards: list[Path]) -> None:
    with pytest.raises(ConfigError, match=r"in no directory given .*shards not given: 2/3"):
        merge_results([shards[0], shards[2]], tmp_path / "m")


def test_a_shard_given_twice_or_overlapping_shards_are_caught(
    tmp_path: Path, shards: list[Path]
) -> None:
    copy = tmp_path / "copy-of-1"
    copy.mkdir()
    (copy / "results.json").write_text((shards[0] / "results.json").read_text())
    with pytest.raises(ConfigError, match="shard 1/3 is given twice"):
        merge_results([*shards, copy], tmp_path / "m")
    # A doctored shard that claims a cell of another: the merge sees the overlap.
    data = json.loads((shards[1] / "results.json").read_text())
    data["planned"].append(json.loads((shards[0] / "results.json").read_text())["planned"][0])
    (shards[1] / "results.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="in more than one directory"):
        merge_results(shards, tmp_path / "m")


def test_different_splits_scenario_sets_and_schema_versions_are_refused(
    tmp_path: Path, shards: list[Path]
) -> None:
    half = shard(tmp_path, "half", "1/2")
    with pytest.raises(ConfigError, match="different splits"):
        merge_results([shards[0], half], tmp_path / "m")
    other = shard(tmp_path, "other", "1/3", scenario="guest-crash")
    with pytest.raises(ConfigError, match=r"different scenario sets .*guest-crash.*matrix"):
        merge_results([other, shards[1]], tmp_path / "m")
    data = json.loads((shards[2] / "results.json").read_text())
    data["version"] = 2
    (shards[2] / "results.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="different schema versions"):
        merge_results(shards, tmp_path / "m")


def test_an_edited_scenario_is_another_scenario(tmp_path: Path, shards: list[Path]) -> None:
    data = json.loads((shards[1] / "results.json").read_text())
    data["scenarios"][0]["sha256"] = "0" * 64
    (shards[1] / "results.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="a scenario file's content differs"):
        merge_results(shards, tmp_path / "m")


def test_a_shard_that_died_part_way_merges_and_its_unrun_cells_are_named(
    tmp_path: Path, shards: list[Path]
) -> None:
    data = json.loads((shards[1] / "results.json").read_text())
    lost = data["cells"].pop()
    data["complete"] = False
    (shards[1] / "results.json").write_text(json.dumps(data))
    merged = merge_results(shards, tmp_path / "m")
    assert not merged.complete and [k.id for k in merged.missing] == [lost["id"]]
    assert not merged.ok


def test_the_merge_command(tmp_path: Path, shards: list[Path]) -> None:
    out = tmp_path / "merged"
    cli = [sys.executable, "-m", "harness.cli", "report"]
    ok = subprocess.run(
        [*cli, "--merge", *map(str, shards), "--out", str(out)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (out / "results.json").exists() and (out / "junit.xml").exists()
    strict = subprocess.run(
        [*cli, "--merge", *map(str, shards), "--out", str(out), "--strict"],
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 1  # the fakes fail the unsafe cells
    bad = subprocess.run(
        [*cli, "--merge", str(shards[0]), "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "shards not given: 2/3, 3/3" in bad.stderr
    no_out = subprocess.run([*cli, "--merge", str(shards[0])], capture_output=True, text=True)
    assert no_out.returncode == 1 and "--merge needs --out" in no_out.stderr


def test_an_empty_share_still_writes_a_results_directory_for_the_merge(tmp_path: Path) -> None:
    dirs = [shard(tmp_path, f"s{k}", f"{k}/12") for k in range(1, 13)]
    empty = [d for d in dirs if not load_results(d).planned_keys]
    assert len(empty) == 2
    merged = merge_results(dirs, tmp_path / "m")
    assert len(merged.cells) == 10 and not merged.missing
