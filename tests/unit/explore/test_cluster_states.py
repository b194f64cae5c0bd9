"""Cluster crash states: one clock over every node's log, the sample, and its shrinking."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from harness.durability.contract import CutPolicy, Promise
from harness.errors import ConfigError
from harness.explore.cluster import (
    ClusterBounds,
    ClusterState,
    ClusterTimeline,
    cluster_states,
    minimize_cluster_state,
)
from harness.explore.states import PointKind

from .conftest import pattern

KiB = 1024
NODES = ("n1", "n2", "n3")


def record_cluster(recorder: Any, acks: int = 3) -> tuple[ClusterTimeline, dict[str, list[int]]]:
    """Three nodes writing in turn on one clock; the client acknowledges after each round.

    Returns the timeline and, per node, how many log records it had at each ack.
    """
    recs = {n: recorder() for n in NODES}
    stamps: list[tuple[str, int]] = []
    records: dict[str, list[int]] = {n: [] for n in NODES}
    for k in range(acks):
        for i, (_n, rec) in enumerate(recs.items()):
            rec.write((k * 4 + i) * 4 * KiB, pattern(10 * k + i))
            if k % 2 == 0:
                rec.flush()
            rec.write((k * 4 + i) * 4 * KiB + 64 * KiB, pattern(100 + 10 * k + i))
        for n, rec in recs.items():
            records[n].append(rec.records())
        time.sleep(0.002)
        stamps.append((str(k + 1), time.monotonic_ns()))
        time.sleep(0.002)
    for rec in recs.values():
        rec.write(200 * KiB, pattern(999))
    logs = {n: rec.finish().read_log() for n, rec in recs.items()}
    keep = {n: Promise.FLUSHED for n in NODES}
    return ClusterTimeline(logs, keep, stamps), records


def test_a_cluster_point_is_the_same_instant_in_every_nodes_log(recorder: Any) -> None:
    ct, records = record_cluster(recorder)
    assert [p.label for p in ct.points] == ["ack 1", "ack 2", "ack 3", "end"]
    assert [p.acked for p in ct.points] == [1, 2, 3, 3]
    for k, point in enumerate(ct.points[:-1]):
        for n in NODES:
            # Every record a node had written before the client saw the ack is before the cut.
            assert point.point(n).at == records[n][k]
            assert PointKind.ACK in point.point(n).kinds
    for n in NODES:
        assert ct.points[-1].point(n).at == ct.timelines[n].wlog.records


def test_all_lose_all_and_all_keep_all_come_first_at_every_point_the_end_first(
    recorder: Any,
) -> None:
    ct, _ = record_cluster(recorder)
    states = cluster_states(ct, ClusterBounds(max_states=100, seed=3))
    canonical = states[: 2 * len(ct.points)]
    assert [s.id for s in canonical[:2]] == ["c3-lose-all", "c3-keep-all"]
    for p in ct.points:
        lose = next(s for s in canonical if s.id == f"c{p.number}-lose-all")
        keep = next(s for s in canonical if s.id == f"c{p.number}-keep-all")
        for n in NODES:
            pending = {w.seq for w in ct.timelines[n].pending(p.point(n))}
            assert pending, "the workload leaves writes pending at every point"
            assert set(lose.state(n).lost) == pending
            assert not keep.state(n).lost and not keep.state(n).torn
    assert len(states) > len(canonical), "mixes follow the canonical states"
    assert any(s.id.startswith("c0-mix") for s in states)


def test_every_nodes_state_is_one_its_contract_allows_at_that_instant(recorder: Any) -> None:
    ct, _ = record_cluster(recorder)
    for s in cluster_states(ct, ClusterBounds(max_states=60, seed=1)):
        for n in NODES:
            node_state = s.state(n)
            assert node_state.point == s.point.point(n)
            node_state.on(ct.timelines[n])  # raises unless every loss is pending there


def test_the_sample_is_bounded_deterministic_per_seed_and_has_no_duplicates(
    recorder: Any,
) -> None:
    ct, _ = record_cluster(recorder)
    a = cluster_states(ct, ClusterBounds(max_states=25, seed=7))
    b = cluster_states(ct, ClusterBounds(max_states=25, seed=7))
    c = cluster_states(ct, ClusterBounds(max_states=25, seed=8))
    assert len(a) == 25
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.key for s in a] == [s.key for s in b]
    assert [s.key for s in a] != [s.key for s in c]
    assert len({s.key for s in a}) == len(a)
    assert len(cluster_states(ct, ClusterBounds(max_states=3))) == 3


def test_points_can_be_limited_to_the_end(recorder: Any) -> None:
    ct, _ = record_cluster(recorder)
    states = cluster_states(ct, ClusterBounds(max_states=50, kinds=(PointKind.END,)))
    assert {s.point.label for s in states} == {"end"}


@pytest.mark.parametrize("kwargs", [{"max_states": 0}, {"per_point": 0}])
def test_an_empty_budget_is_a_clear_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        ClusterBounds(**kwargs)


def _lose_all_at_end(recorder: Any) -> tuple[ClusterTimeline, ClusterState]:
    ct, _ = record_cluster(recorder)
    state = next(s for s in cluster_states(ct, ClusterBounds()) if s.id == "c3-lose-all")
    assert state.deviating == NODES
    return ct, state


def test_shrinking_finds_the_one_node_and_the_one_write_that_matter(recorder: Any) -> None:
    _ct, state = _lose_all_at_end(recorder)
    culprit = state.state("n2").lost[0]
    tried: list[ClusterState] = []

    def fails(s: ClusterState) -> bool:
        tried.append(s)
        return culprit in s.state("n2").lost

    m = minimize_cluster_state(state, fails)
    assert m.nodes == ("n2",)
    assert m.state.deviating == ("n2",)
    assert m.state.losses == [("n2", ("lost", culprit, ()))]
    assert m.state.id == "c3-lose-all-min"
    assert fails(m.state)
    assert m.checks == m.node_checks + m.write_checks > 0
    # Every candidate is the original with less lost: the others kept what they wrote.
    for s in tried:
        for n in NODES:
            assert set(s.state(n).lost) <= set(state.state(n).lost)


def test_shrinking_keeps_a_majority_when_only_a_majority_losing_fails(recorder: Any) -> None:
    _ct, state = _lose_all_at_end(recorder)

    def fails(s: ClusterState) -> bool:
        return len(s.deviating) >= 2

    m = minimize_cluster_state(state, fails)
    assert len(m.nodes) == 2
    assert len(m.state.deviating) == 2
    # One write on each of the two nodes is enough for them to deviate.
    assert len(m.state.losses) == 2


def test_shrinking_stops_at_its_budget_with_a_failing_state(recorder: Any) -> None:
    _ct, state = _lose_all_at_end(recorder)
    calls = [0]

    def fails(s: ClusterState) -> bool:
        calls[0] += 1
        return bool(s.state("n1").lost) and bool(s.state("n3").lost)

    m = minimize_cluster_state(state, fails, max_checks=3)
    assert calls[0] <= 3
    assert m.checks <= 3
    assert fails(m.state)


def test_a_keep_all_node_is_keep_all_by_its_policy_too(recorder: Any) -> None:
    _ct, state = _lose_all_at_end(recorder)
    m = minimize_cluster_state(state, lambda s: "n1" in s.deviating)
    assert m.state.state("n2").policy is CutPolicy.KEEP_ALL
    assert m.state.state("n2").id == f"p{m.state.state('n2').point.number}-keep-all-0"
    assert m.state.state("n1").policy is CutPolicy.LOSE_ALL


def test_cluster_states_round_trip_through_json(recorder: Any) -> None:
    ct, _ = record_cluster(recorder)
    for s in cluster_states(ct, ClusterBounds(max_states=20, seed=2)):
        again = ClusterState.from_json(json.loads(json.dumps(s.to_json())))
        assert again == s
