"""The `[explore]` table: its defaults, every field, and errors that name the line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.durability.contract import CutPolicy
from harness.errors import ScenarioError
from harness.explore.spec import ExploreSpec
from harness.explore.states import PointKind
from harness.scenario.parse import parse_scenario

BASE = """\
name = "t"
modes = ["writeback"]

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "ack-records"
records = 10

[cut]
after-exit = true
"""


def explore(table: str) -> str:
    return BASE + "\n[explore]\n" + table + "\n"


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "s.toml")
    return str(info.value)


def test_a_scenario_without_the_table_has_none_and_an_empty_table_the_defaults() -> None:
    assert parse_scenario(BASE, "s.toml").explore is None
    assert parse_scenario(explore(""), "s.toml").explore == ExploreSpec()


def test_every_field_is_read() -> None:
    spec = parse_scenario(
        explore(
            'max-states = 50\nstates-per-point = 3\npoints = ["ack", "end"]\n'
            'policies = "torn"\nseed = 9\ntear-unit = "4k"\nguest-check = false\n'
            "minimize = 0\nminimize-checks = 10\nunjudged-states = 4"
        ),
        "s.toml",
    ).explore
    assert spec is not None
    assert (spec.max_states, spec.states_per_point, spec.seed, spec.tear_unit) == (50, 3, 9, 4096)
    assert spec.points == (PointKind.ACK, PointKind.END)
    assert spec.policies == (CutPolicy.TORN,)
    assert (spec.guest_check, spec.minimize, spec.minimize_checks) == (False, 0, 10)
    assert spec.unjudged_states == 4 and ExploreSpec().unjudged_states == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max-states = 0", "'explore.max-states' is 0: the exploration budget must be at least 1"),
        ("states-per-point = 0", "'explore.states-per-point' is 0"),
        ('points = ["fluhs"]', "'explore.points' must be one of: flush, fua, ack, end"),
        ("policies = []", "'explore.policies' must not be empty"),
        ('policies = ["torn", "torn"]', "lists a value twice"),
        ("tear-unit = 1000", "'explore.tear-unit' must be a multiple of 512"),
        ("seed = -2", "'explore.seed' must be an integer >= 0"),
        ("guest-check = 1", "'explore.guest-check' must be true or false"),
        ("unjudged-states = -1", "'explore.unjudged-states' must be an integer >= 0"),
        ("minimise = 2", "'explore.minimise' is unknown here; valid fields:"),
    ],
)
def test_bad_values_name_the_file_line_and_field(line: str, message: str) -> None:
    text = explore(line)
    msg = error_of(text)
    assert message in msg
    assert msg.startswith(f"s.toml:{text.splitlines().index(line) + 1}: field ")


def test_every_valid_field_is_documented() -> None:
    readme = (Path(__file__).parents[3] / "scenarios" / "README.md").read_text()
    fields = error_of(explore("zzz = 1")).split("valid fields: ")[1].split(", ")
    assert len(fields) == 10
    assert "## `[explore]`" in readme
    assert not [f for f in fields if f"| `{f}` |" not in readme]
