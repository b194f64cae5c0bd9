"""--shard K/N: every cell in exactly one share, deterministic, balanced; bad input refused."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.commands.run import add_run_arguments, plan_from_args
from harness.crash.plan import expected_seconds, key, make_plan, parse_shard, shard_cells
from harness.errors import ConfigError
from harness.scenario.cells import expand
from harness.scenario.parse import load_scenario

ROOT = Path(__file__).parents[3]
SHIPPED = ("matrix", "guest-crash", "backend-crash", "ext4-metadata", "lying-flush")
SCENARIOS = [ROOT / "scenarios" / f"{name}.toml" for name in SHIPPED]
ALL_CELLS = [c for p in SCENARIOS for c in expand(load_scenario(p))]


@given(count=st.integers(1, 12), take=st.integers(1, len(ALL_CELLS)), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_every_cell_is_in_exactly_one_share(count: int, take: int, seed: int) -> None:
    cells = ALL_CELLS[seed % 7 :][:take] or ALL_CELLS[:take]
    durations = {key(c): float((i * 37 + seed) % 50) for i, c in enumerate(cells) if i % 3 == 0}
    shares = [shard_cells(cells, k, count, durations) for k in range(1, count + 1)]
    placed = [key(c) for share in shares for c in share]
    assert sorted(placed) == sorted(key(c) for c in cells)
    assert len(set(placed)) == len(placed)
    # Each share keeps the plan's order.
    for share in shares:
        positions = [cells.index(c) for c in share]
        assert positions == sorted(positions)


def test_the_split_is_deterministic_and_balanced_by_expected_duration() -> None:
    cells = [c for c in ALL_CELLS if c.scenario == "matrix"]
    a = [shard_cells(cells, k, 3) for k in (1, 2, 3)]
    b = [shard_cells(cells, k, 3) for k in (1, 2, 3)]
    assert a == b
    loads = [sum(expected_seconds(c) for c in share) for share in a]
    longest = max(expected_seconds(c) for c in cells)
    assert max(loads) - min(loads) <= longest  # the greedy bound
    # Recorded durations win over estimates: one slow cell gets a share to itself.
    slow = {key(cells[0]): 10_000.0}
    shares = [shard_cells(cells, k, 2, slow) for k in (1, 2)]
    assert [cells[0]] in [list(s) for s in shares]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/2", "K must be between 1 and N"),
        ("0/2", "K must be between 1 and N"),
        ("1/0", "N must be at least 1"),
        ("2", "write K/N"),
        ("a/b", "write K/N"),
        ("-1/2", "write K/N"),
    ],
)
def test_bad_shards_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_shard(text)


def test_a_plan_records_its_share_and_the_whole(tmp_path: Path) -> None:
    plans = [make_plan(["matrix"], tmp_path, shard=f"{k}/3") for k in (1, 2, 3)]
    whole = make_plan(["matrix"], tmp_path)
    for plan in plans:
        assert plan.shard is not None and plan.shard.plan == whole.planned
    assert sorted(k for p in plans for k in p.planned) == sorted(whole.planned)
    assert whole.shard is None


def test_more_shares_than_cells_leaves_some_empty(tmp_path: Path) -> None:
    plans = [make_plan(["matrix"], tmp_path, shard=f"{k}/12") for k in range(1, 13)]
    assert sum(len(p.cells) for p in plans) == 10
    assert sum(1 for p in plans if not p.cells) == 2


def test_shipped_scenarios_by_name_and_a_clear_error_for_an_unknown_one(tmp_path: Path) -> None:
    assert make_plan(["matrix"], tmp_path).cells == make_plan(["matrix.toml"], tmp_path).cells
    with pytest.raises(ConfigError, match=r"no shipped scenario of that name; shipped: .*matrix"):
        make_plan(["no-such-scenario"], tmp_path)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1, not 0"):
        plan_from_args(_args("matrix", "--out", str(tmp_path), "-j", "0"))
    with pytest.raises(ConfigError, match="only balances --shard"):
        plan_from_args(_args("matrix", "--out", str(tmp_path), "--durations", str(tmp_path)))
    with pytest.raises(ConfigError, match="K must be between"):
        plan_from_args(_args("matrix", "--out", str(tmp_path), "--shard", "3/2"))


def test_the_cli_says_what_is_wrong_with_a_shard(tmp_path: Path) -> None:
    for shard in ("3/2", "0/2"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "run",
                "matrix",
                "--out",
                str(tmp_path),
                "--shard",
                shard,
                "--list",
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 1
        assert f"--shard {shard}: K must be between 1 and N (2)" in result.stderr


def test_list_shows_only_the_share(tmp_path: Path) -> None:
    listed = []
    for k in (1, 2):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "run",
                "matrix",
                "--out",
                str(tmp_path),
                "--shard",
                f"{k}/2",
                "--list",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        listed += result.stdout.splitlines()
    assert len(listed) == 10 and len(set(listed)) == 10
    assert all(line.startswith("matrix: ") for line in listed)
