"""How far to explore one recorded run, and which of its crash states that selects.

`ExploreSpec` is a scenario's `[explore]` table as a value (the scenario
package parses the table into it, `harness/scenario/explore.py`); its
enumeration defaults are `Bounds`' own, so a budget has one default
(`max-states` 200, as scenarios/README.md says). `bounds_for` turns it into
the `Bounds` of one recording: only points from the workload's start on (the
mount and setup before it are not explored, as the runner never cuts there).
`explored_states` puts first what a `powercut run` of the cell would have
left — its lose-all and keep-all cuts at the end — so any budget explores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.durability.contract import CutPolicy, parse_policy
from harness.errors import ConfigError
from harness.explore.states import (
    Bounds,
    PointKind,
    State,
    Timeline,
    enumerate_states,
    parse_point_kind,
)

_BOUNDS = Bounds()


@dataclass(frozen=True)
class ExploreSpec:
    """A scenario's `[explore]` table (every field is documented in scenarios/README.md)."""

    max_states: int = _BOUNDS.max_states
    states_per_point: int = _BOUNDS.per_point
    points: tuple[PointKind, ...] = _BOUNDS.kinds
    policies: tuple[CutPolicy, ...] = _BOUNDS.policies
    seed: int | None = None  # None: the cell's seed
    tear_unit: int = _BOUNDS.tear_unit  # bytes; 0: the write log's sector size
    guest_check: bool = True
    minimize: int = 3
    minimize_checks: int = 48
    # States that may stay unjudged (a check that could not run, a host tool that cannot
    # replay the log) before the cell is an error rather than a verdict on the rest.
    unjudged_states: int = 0

    def with_budget(self, max_states: int) -> ExploreSpec:
        """This spec with the command line's `--max-states` (at least 1)."""
        if max_states < 1:
            raise ConfigError(
                f"--max-states {max_states}: the exploration budget must be at least 1 state"
            )
        return dataclasses.replace(self, max_states=max_states)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_states": self.max_states,
            "states_per_point": self.states_per_point,
            "points": [k.value for k in self.points],
            "policies": [p.value for p in self.policies],
            "seed": self.seed,
            "tear_unit": self.tear_unit,
            "guest_check": self.guest_check,
            "minimize": self.minimize,
            "minimize_checks": self.minimize_checks,
            "unjudged_states": self.unjudged_states,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ExploreSpec:
        seed = raw.get("seed")
        return cls(
            max_states=int(raw["max_states"]),
            states_per_point=int(raw["states_per_point"]),
            points=tuple(parse_point_kind(k) for k in raw["points"]),
            policies=tuple(parse_policy(p) for p in raw["policies"]),
            seed=None if seed is None else int(seed),
            tear_unit=int(raw["tear_unit"]),
            guest_check=bool(raw["guest_check"]),
            minimize=int(raw["minimize"]),
            minimize_checks=int(raw["minimize_checks"]),
            unjudged_states=int(raw.get("unjudged_states", 0)),  # absent before it existed
        )


def bounds_for(spec: ExploreSpec, timeline: Timeline, start_index: int, seed: int) -> Bounds:
    """The spec's bounds on one recording: its points from `start_index` (the workload's
    start) on, or the end alone when none is."""
    kinds = spec.points
    points = tuple(
        p.number for p in timeline.points if p.at >= start_index and set(p.kinds) & set(kinds)
    )
    if not points:
        points = (timeline.points[-1].number,)  # the end is always there
    return Bounds(
        max_states=spec.max_states,
        per_point=spec.states_per_point,
        kinds=kinds,
        policies=spec.policies,
        seed=seed,
        tear_unit=spec.tear_unit,
        points=points,
    )


def explored_states(timeline: Timeline, bounds: Bounds) -> list[State]:
    """The states to check: the runner's own lose-all and keep-all at the end first (what a
    `powercut run` of the cell would have left), then `enumerate_states`' order."""
    first: list[State] = []
    canonical = tuple(p for p in bounds.policies if p in (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL))
    if canonical and PointKind.END in bounds.kinds:
        end = dataclasses.replace(
            bounds,
            points=(timeline.points[-1].number,),
            policies=canonical,
            max_states=len(canonical),
        )
        first = list(enumerate_states(timeline, end))[: bounds.max_states]
    left = bounds.max_states - len(first)
    if left <= 0:
        return first
    ids = {s.id for s in first}
    rest = enumerate_states(timeline, dataclasses.replace(bounds, max_states=left))
    return first + [s for s in rest if s.id not in ids]
