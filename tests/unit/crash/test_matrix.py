"""Matrix expansion: cells, ids, seeds derived from identity, reproduce commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.block.cache import CacheMode
from harness.durability.contract import FaultModel
from harness.durability.cut import CutPolicy
from harness.errors import ConfigError
from harness.scenario.cells import derive_seed, expand, expand_all, select
from harness.scenario.parse import load_scenario, parse_scenario
from harness.vm.spec import Accel

ROOT = Path(__file__).parents[3]

TEXT = """\
name = "m"
modes = ["writeback", "unsafe"]
seed = 11
repetitions = 2

[[fault]]
model = "host-power-cut"
policy = ["lose-all", "torn"]

[[fault]]
model = "guest-power-cut"

[[workload]]
kind = "ack-records"

[[workload]]
kind = "ext4-metadata"

[cut]
window = [1, 3]
"""


def scenario(text: str = TEXT):  # type: ignore[no-untyped-def]
    return parse_scenario(text, "scenarios/m.toml")


def test_cells_are_the_product_of_every_dimension() -> None:
    cells = expand(scenario())
    # 2 modes x (2 policies + 1 guest cut) x 2 workloads x 1 cut x 2 repetitions
    assert len(cells) == 2 * 3 * 2 * 1 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert cells[0].id == "writeback/host-power-cut.lose-all/ack-records/window-1-3s/r0"
    assert [c.mode for c in cells[:12]] == [CacheMode.WRITEBACK] * 12


def test_cells_carry_what_the_backend_and_guest_need() -> None:
    lying = load_scenario(ROOT / "scenarios" / "lying-flush.toml")
    cell = expand(lying)[0]
    assert cell.image == "default" and cell.disk.size == 256 << 20
    assert cell.disk.filesystem == "ext4"
    assert cell.disk.blkdebug == lying.blkdebug and cell.timeout == 120


def test_policy_only_on_host_power_cut() -> None:
    for cell in expand(scenario()):
        if cell.fault is FaultModel.HOST_POWER_CUT:
            assert cell.policy in (CutPolicy.LOSE_ALL, CutPolicy.TORN)
            assert cell.policy_seed is not None
        else:
            assert cell.policy is None and cell.policy_seed is None


def test_same_seed_gives_same_cells_and_other_seed_differs() -> None:
    a, b = expand(scenario()), expand(scenario())
    assert a == b
    c = expand(scenario(), seed=12)
    assert [x.seed for x in a] != [x.seed for x in c]
    assert all(x.scenario_seed == 12 for x in c)


def test_cell_seed_depends_on_identity_not_position() -> None:
    full = {c.id: c.seed for c in expand(scenario())}
    only_unsafe = {c.id: c.seed for c in expand(scenario(), modes=[CacheMode.UNSAFE])}
    assert only_unsafe and all(full[i] == s for i, s in only_unsafe.items())


def test_window_cut_is_resolved_inside_the_window_per_cell() -> None:
    cuts = [c.cut_at for c in expand(scenario())]
    assert all(1.0 <= t <= 3.0 for t in cuts)
    assert len(set(cuts)) > 1


def test_fixed_policy_seed_is_kept() -> None:
    cells = expand(
        scenario(TEXT.replace('policy = ["lose-all", "torn"]', "policy = 'random'\nseed = 99"))
    )
    assert {c.policy_seed for c in cells if c.policy} == {99}


def test_repeat_overrides_repetitions() -> None:
    cells = expand(scenario(), repeat=3)
    assert {c.repetition for c in cells} == {0, 1, 2}
    with pytest.raises(ConfigError, match="--repeat"):
        expand(scenario(), repeat=0)


def test_reproduce_command_selects_exactly_that_cell() -> None:
    cells = expand(scenario(), seed=5, repeat=4)
    target = cells[-1]
    argv = shlex.split(target.reproduce_command(out="/tmp/r", accel=Accel.TCG))
    assert argv[:3] == ["powercut", "run", "scenarios/m.toml"]
    opts = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert opts["--accel"] == "tcg" and opts["--out"] == "/tmp/r"
    # Reproduce without --repeat: the repetition index in the id is enough.
    (again,) = select(scenario(), opts["--cell"], seed=int(opts["--seed"]))
    assert again == target


def test_cell_prefix_selects_a_group_and_unknown_cell_is_an_error() -> None:
    assert len(select(scenario(), "unsafe/")) == 12
    with pytest.raises(ConfigError, match="matches no cell"):
        select(scenario(), "writethrough/")


def test_expand_all_concatenates_scenarios_and_filters_by_cell() -> None:
    matrix = load_scenario(ROOT / "scenarios" / "matrix.toml")
    guest = load_scenario(ROOT / "scenarios" / "guest-crash.toml")
    cells = expand_all([matrix, guest])
    assert len(cells) == len(expand(matrix)) + len(expand(guest))
    picked = expand_all([matrix, guest], cell="unsafe/guest-power-cut/")
    assert picked and all(c.scenario == "guest-crash" for c in picked)
    with pytest.raises(ConfigError):
        expand_all([matrix, guest], cell="nothing/")


def test_shipped_matrix_has_ten_cells() -> None:
    cells = expand(load_scenario(ROOT / "scenarios" / "matrix.toml"))
    assert len(cells) == 10
    assert {c.mode for c in cells} == set(CacheMode)


@given(st.integers(0, 2**63), st.text(max_size=20), st.text(max_size=40))
def test_derived_seeds_are_32_bit_and_stable(seed: int, name: str, cell: str) -> None:
    s = derive_seed(seed, name, cell)
    assert 0 <= s < 2**32
    assert s == derive_seed(seed, name, cell)
