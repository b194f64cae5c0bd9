"""A rack power cut of a 3-node etcd cluster through `power_cut.cluster` (one cell, ~2 min TCG).

The commands are the shipped scenario's (scenarios/etcd-cluster.toml), so
the test and the scenario cannot drift apart: three guests on their own
powercut disks, a client on n1, every disk frozen and every QEMU killed at
one instant, every node rebooted on what its disk kept, etcd recovering on
its own, every acknowledged put found.
"""

from __future__ import annotations

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
