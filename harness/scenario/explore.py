"""A scenario's `[explore]` table: how far `powercut explore` goes from one recorded run.

    [explore]
    max-states = 300             # states explored per cell (the budget), >= 1
    states-per-point = 8         # at most this many states at one persistence point
    points = ["flush", "fua", "ack", "end"]
    policies = ["lose-all", "keep-all", "prefix", "random", "torn"]
    seed = 7                     # default: the cell's own seed
    tear-unit = "4k"             # a torn write loses whole disk-aligned units (default: a sector)
    guest-check = true           # also mount each state in one checker guest and run the check
    minimize = 3                 # failing states shrunk by delta debugging
    minimize-checks = 48         # checks each shrink may spend
    unjudged-states = 0          # states that may stay unjudged before the cell is an error

The value is the exploration engine's own `ExploreSpec`
(`harness.explore.spec`, below this package): its defaults are the engine's
(`Bounds`), its point kinds the engine's `PointKind`. A scenario without the
table is explored with `ExploreSpec()`.
"""

from __future__ import annotations

from harness.durability.contract import CutPolicy
from harness.explore.spec import ExploreSpec
from harness.explore.states import PointKind
from harness.scenario.table import Table

SECTOR = 512
_DEFAULT = ExploreSpec()


def parse_explore(t: Table) -> ExploreSpec:
    """Read an `[explore]` table; every error names the file, the line and the field."""
    max_states = t.integer("max-states", _DEFAULT.max_states)
    if max_states < 1:
        raise t.error(
            "max-states",
            f"is {max_states}: the exploration budget must be at least 1 state",
        )
    per_point = t.integer("states-per-point", _DEFAULT.states_per_point)
    if per_point < 1:
        raise t.error("states-per-point", f"is {per_point}: it must be at least 1")
    points = t.choices("points", PointKind, _DEFAULT.points)
    policies = t.choices("policies", CutPolicy, _DEFAULT.policies)
    seed = t.integer("seed", 0, minimum=0) if t.has("seed") else t.raw("seed")
    tear_unit = t.size("tear-unit", SECTOR, minimum=SECTOR) if t.has("tear-unit") else 0
    t.raw("tear-unit")
    if tear_unit % SECTOR:
        raise t.error("tear-unit", f"must be a multiple of {SECTOR} bytes, not {tear_unit}")
    guest_check = bool(t.typed("guest-check", bool, _DEFAULT.guest_check, "true or false"))
    minimize = t.integer("minimize", _DEFAULT.minimize, minimum=0)
    minimize_checks = t.integer("minimize-checks", _DEFAULT.minimize_checks, minimum=1)
    unjudged = t.integer("unjudged-states", _DEFAULT.unjudged_states, minimum=0)
    t.finish()
    return ExploreSpec(
        max_states=max_states,
        states_per_point=per_point,
        points=points,
        policies=policies,
        seed=seed,
        tear_unit=tear_unit,
        guest_check=guest_check,
        minimize=minimize,
        minimize_checks=minimize_checks,
        unjudged_states=unjudged,
    )
