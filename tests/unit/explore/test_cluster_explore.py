"""A cluster cell's exploration on in-process recordings, with the cluster's boot faked.

The recordings are three nodes' real logs (conftest's `Recorder`) on one
clock; only `ClusterExplorer._check` — booting every node on its state and
running the client's check — is replaced by a rule over the state, so the
sample, the verdicts, the shrinking, explore.json's records and report.md
are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.crash.explorer.cluster import ClusterExplorer, RecordedCluster
from harness.crash.explorer.run import ExploreDoc
from harness.durability.contract import Verdict
from harness.explore.cluster import ClusterState
from harness.explore.doc import ExploreDocument, load_doc
from harness.explore.spec import ExploreSpec
from harness.report.explore import render_explore
from harness.scenario.cells import expand
from harness.scenario.parse import parse_scenario
from harness.workloads.command import CommandObservation

from .test_cluster_states import NODES, record_cluster

SCENARIO = """\
name = "c"
modes = "writeback"
{expect}

[cluster]
nodes = 3
start = "start-it"

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "command"
run = "echo ack 1"
check = "echo 1"

[cut]
after-acked-writes = 3
"""


@pytest.fixture
def recorder_with_list(recorder: Any) -> Any:
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        r = recorder(**kwargs)
        made.append(r)
        return r

    make.made = made  # type: ignore[attr-defined]
    return make


def explorer(tmp_path: Path, *, negative: bool, **spec: Any) -> tuple[ClusterExplorer, ExploreDoc]:
    text = SCENARIO.format(expect='expect = "violation"' if negative else "")
    (cell, *_) = expand(parse_scenario(text, str(tmp_path / "c.toml")))
    doc = ExploreDoc(tmp_path / "out", "powercut explore c.toml", interval=0)
    e = ClusterExplorer(
        cell,
        ExploreSpec(**spec),
        tmp_path / "out" / "cells" / "000",
        None,
        out=tmp_path / "out",
        index=0,
        doc=doc,
    )
    return e, doc


def fake_check(e: ClusterExplorer, rule: Any, seen: list[ClusterState]) -> None:
    """The client's check loses every token acknowledged when `rule(state)` holds."""

    def check(state: ClusterState) -> tuple[Any, str, Path]:
        seen.append(state)
        where = e.directory / "states" / state.id
        where.mkdir(parents=True, exist_ok=True)
        acked = tuple(t for t, _ns in e.recorded.stamps[: state.point.acked])
        if rule(state) is None:
            return None, "GuestError: the cluster was not ready after 600s", where
        lost = acked if rule(state) else ()
        obs = CommandObservation(acked, len(acked) - len(lost), lost, 0)
        return obs, "", where

    e._check = check  # type: ignore[method-assign]


def run(e: ClusterExplorer, recorder: Any) -> None:
    ct, _ = record_cluster(recorder)
    rec = {n: r.finish() for n, r in zip(NODES, recorder.made, strict=True)}
    e.explore(RecordedCluster(rec, ct.acks, r"^ack (\S+)$", "c", {}))


def test_a_loss_when_two_nodes_lose_a_write_is_found_and_shrunk_to_two_nodes(
    tmp_path: Path, recorder_with_list: Any
) -> None:
    e, doc = explorer(tmp_path, negative=False, max_states=12, minimize=1, minimize_checks=40)
    seen: list[ClusterState] = []
    fake_check(e, lambda s: len(s.deviating) >= 2 and s.point.acked > 0, seen)
    run(e, recorder_with_list)
    record = e.snapshot()
    assert record.verdict is Verdict.FAIL
    cluster = record.cluster
    assert cluster is not None
    assert [s.id for s in cluster.states[:2]] == ["c3-lose-all", "c3-keep-all"]
    assert len(cluster.states) == 12
    assert cluster.acks == 3 and cluster.points == 4
    first = cluster.breaking[0]
    assert first.id == "c3-lose-all" and first.lost == ("1", "2", "3")
    assert first.minimized is not None and first.minimized.state is not None
    assert len(first.minimized.nodes) == 2
    assert first.minimized.losses_after == 2 < first.minimized.losses_before
    assert "shrunk to" in record.reason
    assert record.counts.states_breaking_contract == len(cluster.breaking)
    # explore.json holds it all, read back through the records
    doc.finish()
    again = load_doc(tmp_path / "out")
    assert again.cells[0].cluster == cluster
    assert ExploreDocument.from_json(json.loads(again.text())).text() == again.text()
    render_explore(tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(cluster)" in md and "c3-lose-all-min" in md and "breaks the contract" in md


def test_a_positive_cluster_that_keeps_everything_passes(
    tmp_path: Path, recorder_with_list: Any
) -> None:
    e, _doc = explorer(tmp_path, negative=False, max_states=10)
    seen: list[ClusterState] = []
    fake_check(e, lambda s: False, seen)
    run(e, recorder_with_list)
    record = e.snapshot()
    assert record.verdict is Verdict.PASS, record.reason
    assert len(seen) == 10 and record.counts.states_explored == 10
    assert not (e.directory / "states").exists() or not any((e.directory / "states").iterdir())


def test_a_negative_control_passes_only_when_some_state_loses(
    tmp_path: Path, recorder_with_list: Any
) -> None:
    e, _doc = explorer(tmp_path, negative=True, max_states=6, minimize=0)
    fake_check(e, lambda s: False, [])
    run(e, recorder_with_list)
    assert e.snapshot().verdict is Verdict.FAIL
    assert "no loss detected" in e.snapshot().reason


def test_states_that_could_not_be_checked_are_counted_named_and_never_a_pass(
    tmp_path: Path, recorder_with_list: Any
) -> None:
    e, _doc = explorer(tmp_path, negative=False, max_states=4)
    fake_check(e, lambda s: None if s.id == "c3-keep-all" else False, [])
    run(e, recorder_with_list)
    record = e.snapshot()
    assert record.verdict is Verdict.ERROR
    assert record.counts.states_unjudged == 1
    assert "c3-keep-all: GuestError" in record.reason
    assert record.cluster is not None
    assert record.cluster.unjudged[0].directory is not None  # its logs are kept
