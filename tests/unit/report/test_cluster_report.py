"""A cluster cell's record: nodes and time line through results.json and into the reports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from harness.crash.cluster_verdict import NodeJudgement, judge_cluster, judge_disk
from harness.crash.record import cluster_result
from harness.crash.verdict import OracleObservation, Outcome
from harness.durability.contract import CacheMode, CutPolicy, FaultModel, promise
from harness.report.cluster import timeline_rows
from harness.report.html import render_html
from harness.report.markdown import render_markdown
from harness.report.results import (
    NodeResult,
    RunResults,
    TimelineEvent,
    load_results,
    write_results,
)
from harness.scenario.cells import expand
from harness.scenario.parse import load_scenario
from harness.workloads.command import CommandObservation

ROOT = Path(__file__).parents[3]


def cluster_run(lost: int) -> RunResults:
    (cell,) = expand(load_scenario(ROOT / "scenarios" / "etcd-cluster-no-fsync.toml"))
    fault, policy = FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL
    judged = []
    for name in ("n1", "n2", "n3"):
        oracle = OracleObservation(20, 20, 512, 512, 0, 0, 0, unflushed=0)
        disk = judge_disk(CacheMode.WRITEBACK, fault, policy, cell.workload, oracle)
        judged.append(
            NodeJudgement(
                name, CacheMode.WRITEBACK, True, promise(CacheMode.WRITEBACK, fault, policy), disk
            )
        )
    acked = tuple(str(i) for i in range(1, 21))
    client = CommandObservation(acked, 20 - lost, acked[20 - lost :], 0)
    verdict = judge_cluster(Outcome.LOSS_EXPECTED, client, judged)
    timeline = (
        TimelineEvent(0.5, "n1", "power on"),
        TimelineEvent(0.6, "n2", "power on"),
        TimelineEvent(20.0, "n1", "1 acked"),
        TimelineEvent(21.0, "n1", "2 acked"),
        TimelineEvent(22.0, "n1", "3 acked"),
        *(TimelineEvent(22.5, n, "power cut (host-power-cut)") for n in ("n1", "n2", "n3")),
    )
    nodes = tuple(
        NodeResult(j.name, "writeback", True, "pass", j.summary, 22.5, 7, {"console_log": "c"})
        for j in judged
    )
    result = cluster_result(cell, verdict, client, nodes=nodes, timeline=timeline)
    return RunResults(cells=(result,), command="powercut run x", started="s", finished="f")


def test_a_cluster_cell_round_trips_through_results_json(tmp_path: Path) -> None:
    results = cluster_run(lost=11)
    write_results(results, tmp_path)
    assert load_results(tmp_path) == results
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert [n["name"] for n in cell["nodes"]] == ["n1", "n2", "n3"]
    assert cell["timeline"][0] == {"at": 0.5, "node": "n1", "event": "power on"}
    names = [c["name"] for c in cell["checkers"]]
    assert names == ["check", "oracle@n1", "oracle@n2", "oracle@n3"]


def test_a_single_guest_cell_has_no_cluster_fields_in_json(tmp_path: Path) -> None:
    results = cluster_run(lost=11)
    single = dataclasses.replace(results.cells[0], nodes=(), timeline=())
    write_results(dataclasses.replace(results, cells=(single,)), tmp_path)
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert "nodes" not in cell and "timeline" not in cell


def test_the_negative_controls_record_says_who_lost_the_tokens() -> None:
    caught = cluster_run(lost=11).cells[0]
    assert caught.verdict == "pass" and caught.lost == 11 and caught.expected == "loss detected"
    assert "no quorum had made durable" in caught.explanation
    missed = cluster_run(lost=0).cells[0]
    assert missed.verdict == "fail" and missed.explanation == ""


def test_the_time_line_puts_nodes_side_by_side_and_folds_acknowledgements() -> None:
    rows = timeline_rows(cluster_run(lost=11).cells[0])
    assert [r.when for r in rows] == ["0.50", "0.60", "20.00-22.00", "22.50"]
    assert rows[2].cells == ("1..3 acked", "", "")
    assert rows[3].cells == ("power cut (host-power-cut)",) * 3  # one instant, every node


def test_reports_show_the_cluster_nodes_and_time_line() -> None:
    results = cluster_run(lost=11)
    md = render_markdown(results)
    assert "## Clusters" in md and "| t (s) | n1 | n2 | n3 |" in md
    assert "| 20.00-22.00 | 1..3 acked |  |  |" in md
    html = render_html(results)
    assert "<th>n3</th>" in html and "1..3 acked" in html
