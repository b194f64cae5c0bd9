"""Clusters in scenarios: the `[cluster]` table, which nodes a scope cuts, the cluster's verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.crash.cluster_verdict import (
    NodeJudgement,
    cluster_expectation,
    explain_cluster,
    judge_cluster,
    judge_disk,
)
from harness.crash.verdict import OracleObservation, Outcome, Verdict
from harness.durability.contract import CacheMode, CutPolicy, FaultModel, Promise, promise
from harness.errors import ConfigError, ScenarioError
from harness.scenario.cells import expand
from harness.scenario.cluster import ClusterScope, plan_cut
from harness.scenario.model import Expectation, WorkloadSpec
from harness.scenario.parse import load_scenario, parse_scenario
from harness.vm.network import ENV_FILE
from harness.workloads import command
from harness.workloads.command import Command, CommandObservation

SCENARIOS = Path(__file__).parents[3] / "scenarios"

CLUSTER = """\
name = "c"
modes = ["writeback", "unsafe"]

[cluster]
nodes = 3
start = "start-it"
ready = "ready-it"
scope = ["rack", "node", "minority", "majority", "staggered"]
stagger = 0.5

[[cluster.node]]
name = "n3"
mode = "unsafe"
setup = "own-setup"

[[fault]]
model = "host-power-cut"
policy = ["lose-all", "torn"]

[[workload]]
kind = "command"
run = "echo ack 1"
check = "echo 1"

[cut]
after-acked-writes = 5
"""


def test_a_cluster_table_parses_into_nodes_scopes_and_overrides() -> None:
    scenario = parse_scenario(CLUSTER, "c.toml")
    cluster = scenario.cluster
    assert cluster is not None
    assert cluster.names == ("n1", "n2", "n3")
    assert cluster.node("n3").mode is CacheMode.UNSAFE
    assert cluster.node("n1").mode is None
    assert cluster.setup_for("n3") == "own-setup"
    assert cluster.setup_for("n1") is None
    assert cluster.client_node == "n1"
    assert cluster.scopes == tuple(ClusterScope)
    assert cluster.stagger == 0.5


def test_a_cluster_scenario_expands_scopes_after_policies_in_the_cell_id() -> None:
    cells = expand(parse_scenario(CLUSTER, "c.toml"))
    assert len(cells) == 2 * 2 * 5  # modes x policies x scopes
    assert cells[0].id == "writeback/host-power-cut.lose-all.rack/command/after-5-acked/r0"
    assert cells[1].id == "writeback/host-power-cut.lose-all.node/command/after-5-acked/r0"
    assert all(c.cluster is not None for c in cells)


def test_a_single_guest_cell_id_has_no_scope() -> None:
    no_cluster = CLUSTER.split("[cluster]")[0] + CLUSTER.split('setup = "own-setup"\n')[1]
    (cell, *_) = expand(parse_scenario(no_cluster, "c.toml"))
    assert cell.id == "writeback/host-power-cut.lose-all/command/after-5-acked/r0"
    assert cell.cluster is None and cell.scope is None


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (("nodes = 3", "nodes = 0"), "c.toml:5: field 'cluster.nodes' must be an integer >= 1"),
        (('start = "start-it"\n', ""), "field 'cluster.start' is required"),
        (('name = "n3"', 'name = "n9"'), "c.toml:12: field 'cluster.node[0].name' must name one"),
        (('mode = "unsafe"', 'mode = "fast"'), "field 'cluster.node[0].mode' must be one of"),
        (("stagger = 0.5", "stager = 0.5"), "field 'cluster.stager' is unknown here"),
        (
            ('kind = "command"\nrun = "echo ack 1"\ncheck = "echo 1"', 'kind = "ack-records"'),
            "c.toml:21: field 'workload[0].kind' must be \"command\" in a cluster scenario",
        ),
        (
            ('model = "host-power-cut"\npolicy = ["lose-all", "torn"]', 'model = "backend-crash"'),
            "field 'fault[0].model' \"backend-crash\" is not built for a cluster",
        ),
        (("nodes = 3", "nodes = 2"), "field 'cluster.scope' 'minority' needs at least 3 nodes"),
        (
            ('scope = ["rack", "node", "minority", "majority", "staggered"]', 'scope = "rack"'),
            "field 'cluster.stagger' applies to scope = \"staggered\" only",
        ),
    ],
)
def test_a_bad_cluster_table_names_file_line_and_field(edit: tuple[str, str], where: str) -> None:
    text = CLUSTER.replace(*edit)
    if edit[1] == "nodes = 2":
        text = text.replace('name = "n3"', 'name = "n2"')
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, "c.toml")
    assert where in str(err.value)


def test_node_tables_alone_name_the_nodes() -> None:
    text = CLUSTER.replace("nodes = 3\n", "").replace(
        '[[cluster.node]]\nname = "n3"',
        '[[cluster.node]]\nname = "db-a"\n[[cluster.node]]\nname = "db-b"\n'
        '[[cluster.node]]\nname = "db-c"',
    )
    cluster = parse_scenario(text, "c.toml").cluster
    assert cluster is not None
    assert cluster.names == ("db-a", "db-b", "db-c")
    assert cluster.node("db-c").mode is CacheMode.UNSAFE


@pytest.mark.parametrize(
    "path",
    [
        "etcd-cluster.toml",
        "etcd-cluster-no-fsync.toml",
        "redis-replicas.toml",
        "redis-replicas-fsync-no.toml",
    ],
)
def test_shipped_cluster_scenarios_validate(path: str) -> None:
    scenario = load_scenario(SCENARIOS / path)
    assert scenario.cluster is not None and len(scenario.cluster.nodes) == 3


def test_the_etcd_negative_control_differs_only_by_no_fsync_and_expectation() -> None:
    good = load_scenario(SCENARIOS / "etcd-cluster.toml")
    bad = load_scenario(SCENARIOS / "etcd-cluster-no-fsync.toml")
    assert good.cluster is not None and bad.cluster is not None
    assert "--unsafe-no-fsync" in bad.cluster.start
    assert "--unsafe-no-fsync" not in good.cluster.start
    assert bad.cluster.start.replace("--unsafe-no-fsync ", "") == good.cluster.start
    assert bad.expect is Expectation.VIOLATION and good.expect is Expectation.CONTRACT


# -- which nodes a scope cuts -------------------------------------------------------------

NAMES = ("n1", "n2", "n3", "n4", "n5")


@pytest.mark.parametrize(
    ("scope", "count"),
    [
        (ClusterScope.RACK, 5),
        (ClusterScope.NODE, 1),
        (ClusterScope.MINORITY, 2),
        (ClusterScope.MAJORITY, 3),
        (ClusterScope.STAGGERED, 5),
    ],
)
def test_a_scope_cuts_its_share_of_five_nodes(scope: ClusterScope, count: int) -> None:
    plan = plan_cut(scope, NAMES, seed=7)
    assert len(plan.nodes) == count
    assert set(plan.nodes) <= set(NAMES)
    assert list(plan.nodes) == sorted(plan.nodes)  # in the cluster's order


def test_the_same_seed_cuts_the_same_nodes_and_seeds_differ() -> None:
    picks = {plan_cut(ClusterScope.MINORITY, NAMES, seed=s).nodes for s in range(40)}
    assert plan_cut(ClusterScope.MINORITY, NAMES, 3) == plan_cut(ClusterScope.MINORITY, NAMES, 3)
    assert len(picks) > 3  # the seed chooses; not always the same nodes


def test_a_minority_and_a_majority_of_three() -> None:
    three = NAMES[:3]
    assert len(plan_cut(ClusterScope.MINORITY, three, 1).nodes) == 1
    assert len(plan_cut(ClusterScope.MAJORITY, three, 1).nodes) == 2
    with pytest.raises(ConfigError, match="at least 3 nodes"):
        plan_cut(ClusterScope.MINORITY, NAMES[:2], 1)


def test_a_staggered_cut_takes_node_i_at_i_times_the_delay() -> None:
    plan = plan_cut(ClusterScope.STAGGERED, NAMES[:3], seed=1, stagger=0.25)
    assert [(c.node, c.delay) for c in plan.cuts] == [("n1", 0.0), ("n2", 0.25), ("n3", 0.5)]
    assert all(c.delay == 0 for c in plan_cut(ClusterScope.RACK, NAMES, 1).cuts)


def test_a_cells_cut_plan_is_stable_across_expansions() -> None:
    scenario = parse_scenario(CLUSTER, "c.toml")
    first = [c.cut_plan() for c in expand(scenario)]
    again = [c.cut_plan() for c in expand(scenario)]
    assert first == again


# -- the cluster's verdict ----------------------------------------------------------------

WORKLOAD = WorkloadSpec("c", Command("run", "check"), ("oracle", "check"))


def tokens(acked: int, lost: int = 0, exit_code: int = 0) -> CommandObservation:
    all_ = tuple(str(i) for i in range(1, acked + 1))
    return CommandObservation(all_, acked - lost, all_[acked - lost :], exit_code)


def node(name: str, mode: CacheMode = CacheMode.WRITEBACK, *, lost: int = 0, cut: bool = True):
    fault, policy = FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL
    disk = None
    if cut:
        oracle = OracleObservation(10, 10, 80, 80 - lost, 0, lost, 0, unflushed=0)
        disk = judge_disk(mode, fault, policy, WORKLOAD, oracle)
    return NodeJudgement(name, mode, cut, promise(mode, fault, policy), disk)


def test_no_token_lost_and_every_disk_in_contract_passes() -> None:
    v = judge_cluster(Outcome.INTACT, tokens(20), [node("n1"), node("n2"), node("n3")])
    assert v.verdict is Verdict.PASS
    assert "3 of 3 nodes cut" in v.reason and v.explanation == ""


def test_lost_tokens_with_every_disk_in_contract_blame_the_system() -> None:
    v = judge_cluster(Outcome.INTACT, tokens(20, lost=3), [node("n1"), node("n2"), node("n3")])
    assert v.verdict is Verdict.FAIL
    assert "3 of 20 acknowledged tokens lost" in v.reason
    assert "acknowledged what no quorum had made durable" in v.explanation
    assert "every disk that lost power kept its contract" in v.explanation


def test_lost_tokens_with_a_disk_out_of_contract_name_that_disk() -> None:
    nodes = [node("n1"), node("n2", lost=4), node("n3")]
    assert nodes[1].broke_contract and not nodes[0].broke_contract
    v = judge_cluster(Outcome.INTACT, tokens(20, lost=3), nodes)
    assert v.verdict is Verdict.FAIL
    assert "disk n2 broke its contract" in v.reason
    assert "disk n2 broke its contract" in v.explanation
    assert "n1" not in v.explanation.split("broke")[0].split("disk")[-1]


def test_a_disk_out_of_contract_fails_even_when_no_token_was_lost() -> None:
    v = judge_cluster(Outcome.INTACT, tokens(20), [node("n1"), node("n2"), node("n3", lost=1)])
    assert v.verdict is Verdict.FAIL and "disk n3 broke its contract" in v.reason
    assert v.explanation == ""


def test_a_negative_control_passes_only_when_the_loss_is_seen() -> None:
    nodes = [node("n1"), node("n2"), node("n3")]
    caught = judge_cluster(Outcome.LOSS_EXPECTED, tokens(30, lost=11), nodes)
    assert caught.verdict is Verdict.PASS
    assert "no quorum had made durable" in caught.explanation
    missed = judge_cluster(Outcome.LOSS_EXPECTED, tokens(30), nodes)
    assert missed.verdict is Verdict.FAIL and "saw none" in missed.reason


def test_an_unsafe_node_makes_a_loss_allowed_and_is_named() -> None:
    modes = [CacheMode.WRITEBACK, CacheMode.WRITEBACK, CacheMode.UNSAFE]
    fault, policy = FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL
    assert cluster_expectation(modes, fault, policy) is Outcome.LOSS_ALLOWED
    assert cluster_expectation(modes[:2], fault, policy) is Outcome.INTACT
    assert cluster_expectation(modes[:2], fault, policy, Expectation.VIOLATION) is (
        Outcome.LOSS_EXPECTED
    )
    nodes = [node("n1"), node("n2"), node("n3", CacheMode.UNSAFE)]
    v = judge_cluster(Outcome.LOSS_ALLOWED, tokens(20, lost=2), nodes)
    assert v.verdict is Verdict.PASS and "allowed loss" in v.reason
    assert "n3 (cache=unsafe) promised nothing" in v.explanation


def test_a_damaged_check_is_a_loss() -> None:
    v = judge_cluster(Outcome.INTACT, tokens(5, exit_code=1), [node("n1")])
    assert v.verdict is Verdict.FAIL


def test_a_check_that_could_not_run_is_an_error_unless_a_disk_broke() -> None:
    ok = [node("n1"), node("n2")]
    v = judge_cluster(Outcome.INTACT, None, ok, "the client's check could not run: timeout")
    assert v.verdict is Verdict.ERROR and "timeout" in v.reason
    broken = judge_cluster(Outcome.INTACT, None, [node("n1", lost=1), node("n2")])
    assert broken.verdict is Verdict.FAIL and "disk n1 broke its contract" in broken.reason


def test_nodes_that_kept_power_are_not_judged() -> None:
    nodes = [node("n1"), node("n2", cut=False), node("n3", cut=False)]
    assert nodes[1].summary == "kept power" and not nodes[1].broke_contract
    v = judge_cluster(Outcome.INTACT, tokens(20, lost=1), nodes)
    assert "kept its contract (n1 (writeback))" in v.explanation
    assert "1 of 3 nodes cut" not in v.reason  # it failed: the reason is the loss
    assert explain_cluster(tokens(20), nodes) == ""


def test_an_unsafe_disk_cannot_break_its_contract_whatever_its_oracle_saw() -> None:
    for lost in (0, 5):
        unsafe = node("n1", CacheMode.UNSAFE, lost=lost)
        assert unsafe.promise is Promise.NOTHING and not unsafe.broke_contract
    assert node("n1", CacheMode.WRITETHROUGH, lost=5).broke_contract


def test_the_command_workload_reads_the_node_environment_where_the_network_writes_it() -> None:
    assert command.NODE_ENV == ENV_FILE


def test_powercut_explore_takes_cluster_cells_and_their_explore_table() -> None:
    from harness.crash.explorer.record import unexplorable

    (cell, *_) = expand(parse_scenario(CLUSTER, "c.toml"))
    assert cell.cluster is not None and unexplorable(cell) is None
    scenario = parse_scenario(
        CLUSTER + "\n[explore]\nmax-states = 7\nminimize-checks = 5\n", "c.toml"
    )
    assert scenario.explore is not None
    assert (scenario.explore.max_states, scenario.explore.minimize_checks) == (7, 5)
