"""Crash states of a cluster: one allowed state per node at the same cut instant.

A cluster run is recorded once: each node's disk has its own write log (with
data), and the client's acknowledgements are time-stamped on the host's
CLOCK_MONOTONIC, the clock every node's log-writes stamps its records with.
So one instant of the run is a record index in every node's log
(`acks_from_times`): a *cluster point* is one such instant — each
acknowledgement the client received, and the end of the run, where every
node lost power at once.

At a cluster point each node's disk may be left in any state its own cache
mode allows at that instant (`Timeline` under the node's promise, the same
rules as a single guest's). A *cluster state* picks one per node. Scopes fold
away, as cut policies do for a single guest: a node that kept power has, at
that instant, everything it wrote — its keep-all state, which is in every
node's set — so a node, minority or majority cut at that instant is one of
the combinations explored here (what the node did after it is not).

The product of every node's states is far too large to check, so
`cluster_states` takes a bounded, seeded sample: all-lose-all and
all-keep-all at every cluster point first (the end's first: what a rack
cut of `powercut run` would leave), then seeded mixes round-robin over the
points, each node drawing from its own states there. The same recordings,
bounds and seed give the same states with the same ids
(`c<point>-<kind>-<n>`); identical combinations are listed once.

`minimize_cluster_state` shrinks a failing combination in two steps of
ddmin (harness/explore/minimize.py): which nodes must deviate from keep-all
(the others are put back to keep-all), then which of those nodes' lost and
torn writes. Each candidate is a subset of what the contract allowed each
node to lose, so it is a real cluster crash state too.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.durability.contract import CutPolicy, Promise
from harness.durability.writelog import WriteLog
from harness.errors import ConfigError
from harness.explore.minimize import Loss, ddmin, losses_of, state_with
from harness.explore.recording import acks_from_times
from harness.explore.states import (
    Bounds,
    Point,
    PointKind,
    State,
    Timeline,
    check_budget,
    enumerate_states,
)

# A loss of one node: (node, loss) with `Loss` as minimize.py spells it.
NodeLoss = tuple[str, Loss]


@dataclass(frozen=True)
class ClusterPoint:
    """One instant of the run, as a point of every node's own timeline."""

    number: int  # 0, 1, ... in time order
    label: str  # "ack 7" or "end"
    ns: int | None  # the host's CLOCK_MONOTONIC of the instant (None: the end)
    acked: int  # acknowledgements the client had received by then
    nodes: tuple[tuple[str, Point], ...]  # each node's point at this instant

    def point(self, node: str) -> Point:
        for name, point in self.nodes:
            if name == node:
                return point
        raise ConfigError(f"no node {node!r} at cluster point {self.number}")

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "label": self.label,
            "ns": self.ns,
            "acked": self.acked,
            "nodes": {name: p.to_json() for name, p in self.nodes},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterPoint:
        ns = raw.get("ns")
        return cls(
            int(raw["number"]),
            str(raw["label"]),
            None if ns is None else int(ns),
            int(raw.get("acked", 0)),
            tuple((str(n), Point.from_json(p)) for n, p in raw.get("nodes", {}).items()),
        )


class ClusterTimeline:
    """Every node's `Timeline` with the client's acknowledgements placed in its log.

    `logs` and `keep` are per node (in the cluster's order); `acks` are the
    client's (token, CLOCK_MONOTONIC ns) in the order they arrived.
    """

    def __init__(
        self,
        logs: Mapping[str, WriteLog],
        keep: Mapping[str, Promise],
        acks: Sequence[tuple[str, int]],
    ) -> None:
        if not logs:
            raise ConfigError("a cluster timeline needs at least one node's write log")
        self.names = tuple(logs)
        self.acks = tuple((str(t), int(ns)) for t, ns in acks)
        self.timelines: dict[str, Timeline] = {}
        placed: dict[str, list[int]] = {}
        for name, wlog in logs.items():
            node_acks = acks_from_times(wlog, self.acks)
            placed[name] = [a.index for a in node_acks]
            self.timelines[name] = Timeline(wlog, keep[name], node_acks)
        points: list[ClusterPoint] = []
        for k, (token, ns) in enumerate(self.acks):
            nodes = tuple((n, self._point_at(n, placed[n][k])) for n in self.names)
            points.append(ClusterPoint(k, f"ack {token}", ns, k + 1, nodes))
        end = tuple((n, self.timelines[n].points[-1]) for n in self.names)
        points.append(ClusterPoint(len(points), "end", None, len(self.acks), end))
        self.points = points

    def _point_at(self, node: str, at: int) -> Point:
        for point in self.timelines[node].points:
            if point.at == at:
                return point
        raise ConfigError(f"node {node}: no persistence point at record {at}")  # pragma: no cover

    def point(self, number: int) -> ClusterPoint:
        if not 0 <= number < len(self.points):
            raise ConfigError(f"no cluster point {number}; this run has {len(self.points)}")
        return self.points[number]


@dataclass(frozen=True)
class ClusterState:
    """One state per node at one cluster point."""

    id: str
    point: ClusterPoint
    nodes: tuple[tuple[str, State], ...]  # in the cluster's order

    def state(self, node: str) -> State:
        for name, state in self.nodes:
            if name == node:
                return state
        raise ConfigError(f"no node {node!r} in cluster state {self.id}")

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.point.number, *((name, s.key) for name, s in self.nodes))

    @property
    def deviating(self) -> tuple[str, ...]:
        """The nodes that lose something (the others keep all they wrote)."""
        return tuple(name for name, s in self.nodes if s.lost or s.torn)

    @property
    def losses(self) -> list[NodeLoss]:
        return [(name, loss) for name, s in self.nodes for loss in losses_of(s)]

    def describe(self) -> str:
        parts = []
        for name, s in self.nodes:
            if not (s.lost or s.torn):
                parts.append(f"{name} keeps all")
            else:
                torn = f", tears {len(s.torn)}" if s.torn else ""
                parts.append(f"{name} loses {len(s.lost)} of {s.pending}{torn} ({s.policy.value})")
        return f"at {self.point.label}: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "point": self.point.to_json(),
            "nodes": {name: s.to_json() for name, s in self.nodes},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterState:
        return cls(
            str(raw["id"]),
            ClusterPoint.from_json(raw["point"]),
            tuple((str(n), State.from_json(s)) for n, s in raw.get("nodes", {}).items()),
        )


@dataclass(frozen=True)
class ClusterBounds:
    """How many cluster states, how many states per node at a point, the policies, the seed."""

    max_states: int = 200
    per_point: int = 8  # states per node at a point to draw mixes from
    policies: tuple[CutPolicy, ...] = (
        CutPolicy.LOSE_ALL,
        CutPolicy.KEEP_ALL,
        CutPolicy.PREFIX,
        CutPolicy.RANDOM,
        CutPolicy.TORN,
    )
    seed: int = 0
    tear_unit: int = 0
    kinds: tuple[PointKind, ...] = (PointKind.ACK, PointKind.END)

    def __post_init__(self) -> None:
        check_budget(self.max_states, self.per_point)


def node_states(timeline: Timeline, point: Point, bounds: ClusterBounds) -> list[State]:
    """One node's states at `point` by its own contract: lose-all and keep-all first."""
    canonical = (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL)
    policies = (*canonical, *(p for p in bounds.policies if p not in canonical))
    node_bounds = Bounds(
        max_states=bounds.per_point + 1,
        per_point=max(2, bounds.per_point),
        kinds=tuple(PointKind),
        policies=policies,
        seed=bounds.seed,
        tear_unit=bounds.tear_unit,
        points=(point.number,),
    )
    return list(enumerate_states(timeline, node_bounds))


def _by_policy(states: Sequence[State], policy: CutPolicy) -> State:
    for s in states:
        if s.policy is policy:
            return s
    return states[0]  # keep-all and lose-all coincide when nothing is pending


def cluster_states(ct: ClusterTimeline, bounds: ClusterBounds) -> list[ClusterState]:
    """The sample to check, in order, at most `bounds.max_states` (module docstring)."""
    kind = {True: PointKind.END, False: PointKind.ACK}
    wanted = [p for p in ct.points if kind[p.label == "end"] in bounds.kinds]
    order = sorted(wanted, key=lambda p: (p.label != "end", p.number))
    per_node: dict[int, dict[str, list[State]]] = {
        p.number: {n: node_states(ct.timelines[n], point, bounds) for n, point in p.nodes}
        for p in order
    }
    out: list[ClusterState] = []
    seen: set[tuple[Any, ...]] = set()

    def add(state: ClusterState) -> bool:
        if state.key in seen:
            return False
        seen.add(state.key)
        out.append(state)
        return True

    for p in order:
        for policy in (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL):
            nodes = tuple((n, _by_policy(per_node[p.number][n], policy)) for n, _pt in p.nodes)
            add(ClusterState(f"c{p.number}-{policy.value}", p, nodes))
            if len(out) >= bounds.max_states:
                return out
    mixes = {p.number: _mixes(p, per_node[p.number], bounds) for p in order}
    while mixes:
        for number in list(mixes):
            got = next(mixes[number], None)
            if got is None:
                del mixes[number]
                continue
            if add(got) and len(out) >= bounds.max_states:
                return out
    return out


def _mixes(
    point: ClusterPoint, states: Mapping[str, list[State]], bounds: ClusterBounds
) -> Iterator[ClusterState]:
    """Seeded combinations at one point: each node draws one of its states."""
    rng = random.Random(f"{bounds.seed}/cluster/{point.number}")
    names = [n for n, _p in point.nodes]
    choices = 1
    for n in names:
        choices *= len(states[n])
    tries = min(4 * bounds.per_point, 4 * choices)
    for k in range(tries):
        nodes = tuple((n, rng.choice(states[n])) for n in names)
        yield ClusterState(f"c{point.number}-mix-{k}", point, nodes)


def keep_all(state: State) -> State:
    """The node's keep-all state at the same point."""
    return dataclasses.replace(
        state,
        id=f"p{state.point.number}-{CutPolicy.KEEP_ALL.value}-0",
        policy=CutPolicy.KEEP_ALL,
        lost=(),
        torn=(),
    )


def with_nodes(state: ClusterState, deviate: Sequence[str], suffix: str) -> ClusterState:
    """`state` with every node not in `deviate` put back to keep-all."""
    keep = set(deviate)
    nodes = tuple((n, s if n in keep else keep_all(s)) for n, s in state.nodes)
    return ClusterState(f"{state.id}{suffix}", state.point, nodes)


def with_losses(state: ClusterState, losses: Sequence[NodeLoss], suffix: str) -> ClusterState:
    """`state` losing only `losses` (each node keeps every other write)."""
    nodes = tuple(
        (n, state_with(s, [loss for node, loss in losses if node == n], "")) for n, s in state.nodes
    )
    return ClusterState(f"{state.id}{suffix}", state.point, nodes)


@dataclass(frozen=True)
class ClusterMinimized:
    state: ClusterState  # the smallest failing combination found (id: the original's + "-min")
    original: ClusterState
    nodes: tuple[str, ...]  # the nodes that must deviate from keep-all
    node_checks: int  # checks the first step (nodes) made
    write_checks: int  # checks the second step (writes) made

    @property
    def checks(self) -> int:
        return self.node_checks + self.write_checks


def minimize_cluster_state(
    state: ClusterState,
    fails: Callable[[ClusterState], bool],
    *,
    max_checks: int | None = 48,
) -> ClusterMinimized:
    """The fewest deviating nodes, then the fewest of their losses, that still fail.

    `fails` must be true of `state`. `max_checks` bounds both steps together;
    what is left of it after the nodes goes to the writes.
    """
    n = [0]

    def node_test(subset: list[str]) -> bool:
        n[0] += 1
        return fails(with_nodes(state, subset, f"-try{n[0]}"))

    nodes, node_checks = ddmin(list(state.deviating), node_test, max_checks=max_checks)
    narrowed = with_nodes(state, nodes, "")
    left = None if max_checks is None else max(0, max_checks - node_checks)

    def loss_test(subset: list[NodeLoss]) -> bool:
        n[0] += 1
        return fails(with_losses(narrowed, subset, f"-try{n[0]}"))

    write_checks = 0
    losses = narrowed.losses
    if left is None or left > 0:
        losses, write_checks = ddmin(losses, loss_test, max_checks=left)
    final = with_losses(narrowed, losses, "-min")
    return ClusterMinimized(
        dataclasses.replace(final, id=f"{state.id}-min"),
        state,
        tuple(nodes),
        node_checks,
        write_checks,
    )
