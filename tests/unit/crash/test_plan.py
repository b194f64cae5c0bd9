"""`powercut run`'s arguments become a plan: validated scenarios and the selected cells."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from harness.block.cache import CacheMode
from harness.cli import main
from harness.commands.run import add_run_arguments, plan_from_args
from harness.errors import ConfigError, ScenarioError

ROOT = Path(__file__).parents[3]
MATRIX = str(ROOT / "scenarios" / "matrix.toml")
GUEST = str(ROOT / "scenarios" / "guest-crash.toml")
EXT4 = str(ROOT / "scenarios" / "ext4-metadata.toml")  # three faults per mode and workload


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="powercut run")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def test_all_cells_of_all_scenarios_by_default() -> None:
    plan = plan_from_args(parse([MATRIX, GUEST, "--out", "r"]))
    assert len(plan.cells) == 10 + 10 and plan.accel is None
    assert plan.cells[0].scenario == "matrix" and plan.cells[-1].scenario == "guest-crash"


def test_mode_seed_and_repeat_select_and_override() -> None:
    plan = plan_from_args(
        parse(
            [
                MATRIX,
                "--out",
                "r",
                "--mode",
                "off",
                "--mode",
                "unsafe",
                "--seed",
                "9",
                "--repeat",
                "2",
            ]
        )
    )
    assert {c.mode for c in plan.cells} == {CacheMode.NONE, CacheMode.UNSAFE}
    assert len(plan.cells) == 2 * 2 * 2
    assert {c.scenario_seed for c in plan.cells} == {9}


def test_reproduce_command_runs_the_same_cell() -> None:
    plan = plan_from_args(parse([MATRIX, "--out", "r", "--seed", "4", "--accel", "tcg"]))
    cell = plan.cells[3]
    argv = shlex.split(plan.reproduce(cell))
    assert argv[:2] == ["powercut", "run"] and argv[argv.index("--accel") + 1] == "tcg"
    again = plan_from_args(parse(argv[2:]))
    assert again.cells == (cell,)


def test_bad_mode_and_unknown_cell_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--mode 'fast' is not a cache mode"):
        plan_from_args(parse([MATRIX, "--out", "r", "--mode", "fast"]))
    with pytest.raises(ConfigError, match="matches no cell"):
        plan_from_args(parse([MATRIX, "--out", "r", "--cell", "nope/"]))


def test_a_bad_scenario_stops_the_plan(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('modes = "fast"\n')
    with pytest.raises(ScenarioError, match=r"bad\.toml:1"):
        plan_from_args(parse([str(bad), "--out", "r"]))


def test_cell_directories_are_unique_and_filesystem_safe() -> None:
    plan = plan_from_args(parse([MATRIX, GUEST, "--out", "r"]))
    dirs = [plan.cell_directory(i, c) for i, c in enumerate(plan.cells)]
    assert len(set(dirs)) == len(dirs)
    assert all(d.parent == Path("r") / "cells" and "/" not in d.name for d in dirs)
    assert dirs[0].name == "000-matrix_writeback_host-power-cut.lose-all_fio-verify_after-4s_r0"


def test_cell_takes_a_run_id_or_an_exploration_id_in_run_and_explore_alike(
    capsys: pytest.CaptureFixture[str],
) -> None:
    everything = plan_from_args(parse([EXT4, "--out", "r"])).cells
    cell = next(c for c in everything if c.fault.value == "host-power-cut")
    same_exploration = tuple(c for c in everything if c.exploration_id == cell.exploration_id)
    assert len(same_exploration) > 1  # the exploration id folds the faults away
    assert plan_from_args(parse([EXT4, "--out", "r", "--cell", cell.id])).cells == (cell,)
    by_exploration = plan_from_args(parse([EXT4, "--out", "r", "--cell", cell.exploration_id]))
    assert by_exploration.cells == same_exploration
    # A prefix is of whole parts: r1 is not r10's prefix.
    assert not cell.named(cell.id[:-1]) and cell.named(cell.id.rsplit("/", 1)[0] + "/")
    for wanted in (cell.id, cell.exploration_id):
        assert main(["explore", EXT4, "--list", "--cell", wanted]) == 0
        listed = " ".join(capsys.readouterr().out.split())  # one line, however rich wraps it
        assert listed == f"{cell.scenario}: {cell.exploration_id} seed={same_exploration[0].seed}"
    assert main(["explore", EXT4, "--list", "--cell", "nope/"]) == 1
    assert "--cell 'nope/' matches no cell" in capsys.readouterr().err
