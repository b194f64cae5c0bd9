"""A cluster in a scenario: its nodes, its commands, and which nodes a power fault takes.

A `[cluster]` table (schema: scenarios/README.md) turns a scenario's cells
into cluster cells: N guests, each on its own powercut disk with its own
cache mode when a `[[cluster.node]]` says so (one misconfigured replica is a
real case), on a private network (harness/vm/network.py). The scenario's
`[[workload]]` is the cluster's client: its `run` prints `ack TOKEN` for
what the cluster acknowledged, its `check` runs after every node is back.

A power fault of a cluster has a *scope*: which nodes lose power, and when.
`plan_cut` decides it from the scope, the node names and the cell's seed,
and nothing else, so the same `--seed` cuts the same nodes:

* `rack` — every node at one instant (every disk frozen, then every QEMU killed);
* `node` — one node;
* `minority` — the largest group that is not a majority, (N-1)//2 nodes (N >= 3);
* `majority` — N//2 + 1 nodes;
* `staggered` — every node, node i (in the cluster's order) `stagger` seconds after node i-1.

Under each, the per-node policy (lose-all, prefix, random, torn, keep-all)
is the scenario's `[[fault]]` policy, each node drawing from its own seed.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from harness.durability.contract import CacheMode
from harness.errors import ConfigError


class ClusterScope(enum.Enum):
    """Which nodes of a cluster a power fault takes."""

    RACK = "rack"
    NODE = "node"
    MINORITY = "minority"
    MAJORITY = "majority"
    STAGGERED = "staggered"

    def size(self, nodes: int) -> int:
        """How many of `nodes` nodes this scope cuts."""
        if self is ClusterScope.NODE:
            return 1
        if self is ClusterScope.MINORITY:
            return (nodes - 1) // 2
        if self is ClusterScope.MAJORITY:
            return nodes // 2 + 1
        return nodes

    def minimum_nodes(self) -> int:
        """The smallest cluster this scope means something in (a minority needs 3 nodes)."""
        return 3 if self is ClusterScope.MINORITY else 1


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name (its host name on the private network) and what it overrides."""

    name: str
    mode: CacheMode | None = None  # None: the cell's mode
    setup: str | None = None  # None: the cluster's setup

    def mode_in(self, cell_mode: CacheMode) -> CacheMode:
        return self.mode if self.mode is not None else cell_mode


@dataclass(frozen=True)
class ClusterSpec:
    """The `[cluster]` table: the nodes, the commands every node runs, where the client runs.

    `setup` runs once on every node after its fresh filesystem is mounted
    (the first boot only); `start` on every node at every boot (the first
    and each after a cut) to start the replicated system; `ready` on the
    client node, retried until it exits 0 or `ready_timeout` passes, after
    every boot. Every command runs with the node's filesystem at /mnt and
    the node environment (`POWERCUT_NODE`, `POWERCUT_NODE_ADDRESS`,
    `POWERCUT_NODES`, harness/vm/network.py).
    """

    nodes: tuple[NodeSpec, ...]
    start: str
    ready: str | None = None
    ready_timeout: float = 300.0
    setup: str | None = None
    client: str = ""  # the node the workload's run and check go to ("" : the first)
    scopes: tuple[ClusterScope, ...] = (ClusterScope.RACK,)
    stagger: float = 1.0  # seconds between nodes of a staggered cut
    memory_mib: int = 512  # per node

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    @property
    def client_node(self) -> str:
        return self.client or self.nodes[0].name

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"no node {name!r} in the cluster; it has {', '.join(self.names)}")

    def setup_for(self, name: str) -> str | None:
        own = self.node(name).setup
        return own if own is not None else self.setup


@dataclass(frozen=True)
class NodeCut:
    """One node's part of a cut: it loses power `delay` seconds after the cut begins."""

    node: str
    delay: float = 0.0


@dataclass(frozen=True)
class CutPlan:
    """Which nodes a cut takes and when, in the order they lose power."""

    scope: ClusterScope
    cuts: tuple[NodeCut, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(c.node for c in self.cuts)

    def label(self) -> str:
        at = ", ".join(f"{c.node}@+{c.delay:g}s" if c.delay else c.node for c in self.cuts)
        return f"{self.scope.value}: {at}"


def plan_cut(
    scope: ClusterScope, names: tuple[str, ...], seed: int, stagger: float = 1.0
) -> CutPlan:
    """The nodes `scope` cuts among `names`, chosen by `seed` (the same seed, the same nodes).

    A node, a minority and a majority are a seeded sample, listed in the
    cluster's order; a staggered cut takes node i at i * `stagger` seconds.
    """
    count = scope.size(len(names))
    if len(names) < scope.minimum_nodes() or count < 1:
        raise ConfigError(
            f"a {scope.value} cut needs at least {max(2, scope.minimum_nodes())} nodes; "
            f"the cluster has {len(names)}"
        )
    if scope is ClusterScope.STAGGERED:
        return CutPlan(scope, tuple(NodeCut(n, round(i * stagger, 6)) for i, n in enumerate(names)))
    if count >= len(names):
        return CutPlan(scope, tuple(NodeCut(n) for n in names))
    chosen = set(random.Random(seed).sample(names, count))
    return CutPlan(scope, tuple(NodeCut(n) for n in names if n in chosen))
