"""Cluster cuts through `power_cut.cluster`: an etcd rack cut (~2 min TCG), a minority and a
staggered cut (~1 min each); exploring a cluster (~1.5 min).

The commands are the shipped scenario's (scenarios/etcd-cluster.toml), so
the test and the scenario cannot drift apart: three guests on their own
powercut disks, a client on n1, every disk frozen and every QEMU killed at
one instant, every node rebooted on what its disk kept, etcd recovering on
its own, every acknowledged put found.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from harness.scenario.model import CutSpec, TriggerKind
from harness.scenario.parse import load_scenario

pytestmark = pytest.mark.vm

ETCD = load_scenario(Path(__file__).parents[2] / "scenarios" / "etcd-cluster.toml")


def test_a_rack_cut_of_three_etcd_nodes_keeps_every_acknowledged_put(power_cut: Any) -> None:
    cluster = ETCD.cluster
    assert cluster is not None
    command = ETCD.workloads[0].workload
    result = power_cut.cluster(
        run=command.run_command,
        check=command.check_command,
        start=cluster.start,
        ready=cluster.ready,
        nodes=3,
        scope="rack",
        cut=CutSpec(TriggerKind.AFTER_ACKED_WRITES, 8),
        packages=list(ETCD.guest.packages),
        disk_size=ETCD.disk_size,
        timeout=900,
    )
    assert result.passed, f"{result.reason}: {result.explanation}"
    assert result.writes_acknowledged >= 8 and result.lost == 0
    assert [n.name for n in result.nodes] == ["n1", "n2", "n3"]
    assert all(n.cut and n.verdict == "pass" for n in result.nodes), result.nodes
    cuts = {e.at for e in result.timeline if e.event.startswith("power cut")}
    assert len(cuts) == 1, f"a rack cut is one instant on the cell's clock: {cuts}"
    assert [c.name for c in result.checkers] == ["check", "oracle@n1", "oracle@n2", "oracle@n3"]


# The cheapest real proof of the other scopes: no replicated system, only the cut. Every node
# runs a synced append log of its own (`start`); the client acknowledges what it synced. What
# is checked is the scope: which nodes lose power, when, and that only they are rebooted.
APPEND = "for i in $(seq 1 100000); do echo $i >> /mnt/log && sync /mnt/log && echo ack $i; done"
CHECK = "cat /mnt/log"
SCOPE_CELL = {
    "run": APPEND,
    "check": CHECK,
    "start": "true",
    "nodes": 3,
    "cut": CutSpec(TriggerKind.AFTER_ACKED_WRITES, 5),
    "memory_mib": 384,
    "timeout": 600,
}


def _power_events(result: Any) -> dict[str, list[float]]:
    events: dict[str, list[float]] = {}
    for e in result.timeline:
        if e.event.startswith("power cut") or e.event == "power on":
            events.setdefault(e.node, []).append(e.at)
    return events


def test_a_minority_cut_takes_one_node_of_three_and_reboots_only_it(power_cut: Any) -> None:
    result = power_cut.cluster(scope="minority", seed=5, **SCOPE_CELL)
    assert result.passed, f"{result.reason}: {result.explanation}"
    cut = [n for n in result.nodes if n.cut]
    kept = [n for n in result.nodes if not n.cut]
    assert len(cut) == 1 and len(kept) == 2, result.nodes
    assert cut[0].verdict == "pass" and all(n.verdict == "not cut" for n in kept)
    cuts = [e for e in result.timeline if e.event.startswith("power cut")]
    assert [e.node for e in cuts] == [cut[0].name]
    powered = _power_events(result)
    # Every node powered on once; the cut node once more, after its cut.
    assert len(powered[cut[0].name]) == 3 and all(len(powered[n.name]) == 1 for n in kept)
    assert result.writes_acknowledged >= 5 and result.lost == 0


def test_a_staggered_cut_takes_every_node_one_stagger_apart(power_cut: Any) -> None:
    result = power_cut.cluster(scope="staggered", stagger=2.0, **SCOPE_CELL)
    assert result.passed, f"{result.reason}: {result.explanation}"
    assert all(n.cut and n.verdict == "pass" for n in result.nodes), result.nodes
    at = [n.cut_at or 0.0 for n in result.nodes]
    assert all(n.cut_at is not None for n in result.nodes)
    gaps = [b - a for a, b in itertools.pairwise(at)]
    # n1, then n2 two seconds later, then n3: in the cluster's order, a stagger apart.
    assert all(1.9 <= g <= 6.0 for g in gaps), at
    assert result.writes_acknowledged >= 5 and result.lost == 0


# Exploring a cluster: the append log without sync, a negative control. At an acknowledgement the
# line is in the client's page cache only, so some combination of the nodes' states loses it.
UNSYNCED = """\
name = "unsynced-append"
modes = "writeback"
expect = "violation"
timeout = 600

[cluster]
nodes = 3
start = "true"
memory = 384

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "command"
run = "for i in $(seq 1 100000); do echo $i >> /mnt/log && echo ack $i; sleep 0.2; done"
check = "cat /mnt/log 2>/dev/null; true"

[cut]
after-acked-writes = 4

[explore]
max-states = 2
minimize = 0
"""


def test_exploring_a_cluster_checks_combinations_by_booting_every_node(
    power_cut: Any, tmp_path: Path
) -> None:
    from harness.crash.explorer.cluster import ClusterExplorer
    from harness.crash.images import CellImages
    from harness.durability.contract import Verdict
    from harness.scenario.cells import expand
    from harness.scenario.parse import parse_scenario

    scenario = parse_scenario(UNSYNCED, str(tmp_path / "unsynced.toml"))
    cell = expand(scenario)[0]
    assert scenario.explore is not None
    explorer = ClusterExplorer(
        cell,
        scenario.explore,
        tmp_path / "cell",
        CellImages(default=power_cut.image)(cell),
        out=tmp_path,
        index=0,
        accel=power_cut.accel,
    )
    record = explorer.run().record
    cluster = record.cluster
    assert cluster is not None
    assert record.verdict is Verdict.PASS, record.reason  # the loss was found
    assert cluster.acks >= 4 and cluster.points == cluster.acks + 1
    assert [s.id for s in cluster.states][:1] == [f"c{cluster.acks}-lose-all"]
    assert len(cluster.states) == 2 and not cluster.unjudged, cluster.states
    assert cluster.failing, "some combination must lose an unsynced acknowledged line"
    assert all(n in cluster.recordings for n in ("n1", "n2", "n3"))
