"""A cluster's verdict: did what the cluster acknowledged survive, and if not, who lost it?

Each node's disk is judged as a single guest's is: the oracle against the
contract of that node's cache mode (`expected_for` and `judge`, the same
rules). The cluster's verdict is composed from those and from the client's
check (the `command` workload's `CommandObservation`: acknowledged tokens
against the tokens the check found after every node was back):

* no acknowledged token lost, every disk within its contract: PASS;
* tokens lost and a disk broke its contract: that disk is named; the
  cluster's loss may follow from it (FAIL);
* tokens lost and every disk that lost power kept its contract: the system
  acknowledged what no quorum had made durable (FAIL; the expected finding
  of a negative control, which passes only when the loss is seen);
* tokens lost where a node's cache mode promises nothing (unsafe under a
  host power cut): an allowed loss, explained by naming that node.

A check that could not run is an ERROR, unless a disk that broke its
contract already decides the cell (evidence beats silence, as in
`harness.crash.verdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from harness.crash.verdict import (
    CellVerdict,
    Observed,
    OracleObservation,
    Outcome,
    Verdict,
    expected_for,
    judge,
)
from harness.durability.contract import CacheMode, CutPolicy, FaultModel, Promise, promise
from harness.scenario.model import Expectation, WorkloadSpec
from harness.workloads.base import ORACLE, Observation


def judge_disk(
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy | None,
    workload: WorkloadSpec,
    oracle: OracleObservation,
) -> CellVerdict:
    """One node's disk against its mode's contract, by the single guest's rules.

    Only whether the disk kept its contract is asked: a node whose mode
    promises nothing (unsafe under lose-all) is no negative control of its
    own, so its oracle may see a loss and need not.
    """
    expected = expected_for(mode, fault, policy, workload, (ORACLE,))
    if expected.loss_must_be_detected:
        expected = dataclasses.replace(
            expected, loss_must_be_detected=False, checkers={ORACLE: Outcome.LOSS_ALLOWED}
        )
    return judge(expected, Observed.of({ORACLE: oracle}))


@dataclass(frozen=True)
class NodeJudgement:
    """One node after the cut: its mode, whether it lost power, its disk's verdict."""

    name: str
    mode: CacheMode
    cut: bool
    promise: Promise  # what its mode promises across the fault (Promise.NOTHING: unsafe)
    disk: CellVerdict | None = None  # the oracle's, when it lost power and the oracle ran

    @property
    def broke_contract(self) -> bool:
        return self.disk is not None and self.disk.verdict is Verdict.FAIL

    @property
    def summary(self) -> str:
        if not self.cut:
            return "kept power"
        if self.disk is None:
            return "lost power; its disk was not judged"
        return self.disk.reason


@dataclass(frozen=True)
class ClusterVerdict:
    verdict: Verdict
    reason: str
    expected: Outcome  # what the client's check must find
    nodes: tuple[NodeJudgement, ...]
    explanation: str = ""  # who lost the acknowledged tokens, when some were lost

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


def cluster_expectation(
    node_modes: Sequence[CacheMode],
    fault: FaultModel,
    policy: CutPolicy | None,
    expect: Expectation = Expectation.CONTRACT,
) -> Outcome:
    """What the client's check must find, from the modes of the nodes that lose power.

    A negative control must see a loss. A node whose mode promises nothing
    (unsafe under a host power cut) may take acknowledged data with it: a
    loss is then allowed (and explained). Otherwise every acknowledged token
    must survive.
    """
    if expect is Expectation.VIOLATION:
        return Outcome.LOSS_EXPECTED
    if any(promise(m, fault, policy) is Promise.NOTHING for m in node_modes):
        return Outcome.LOSS_ALLOWED
    return Outcome.INTACT


def explain_cluster(client: Observation, nodes: Sequence[NodeJudgement]) -> str:
    """Who lost the acknowledged tokens, in words (empty when none were lost)."""
    if not client.loss:
        return ""
    lost = client.summary()
    broken = [n for n in nodes if n.broke_contract]
    if broken:
        named = "; ".join(f"disk {n.name} ({n.mode.value}): {n.summary}" for n in broken)
        return (
            f"the cluster lost acknowledged data ({lost}); "
            f"{'disk' if len(broken) == 1 else 'disks'} "
            f"{', '.join(n.name for n in broken)} broke {'its' if len(broken) == 1 else 'their'} "
            f"contract, and the loss may follow from it: {named}"
        )
    cut = [n for n in nodes if n.cut]
    unsafe = [n for n in cut if n.promise is Promise.NOTHING]
    if unsafe:
        names = ", ".join(f"{n.name} (cache={n.mode.value})" for n in unsafe)
        return (
            f"the cluster lost acknowledged data ({lost}); {names} promised nothing across the "
            "power cut, and its disk lost what its guest had flushed"
        )
    judged = [n for n in cut if n.disk is not None]
    kept = ", ".join(f"{n.name} ({n.mode.value})" for n in judged) or "none judged"
    return (
        f"every disk that lost power kept its contract ({kept}), so the system acknowledged "
        f"what no quorum had made durable: {lost}"
    )


def judge_cluster(
    expected: Outcome,
    client: Observation | None,
    nodes: Sequence[NodeJudgement],
    client_error: str = "",
) -> ClusterVerdict:
    """The cluster's verdict from the client's check and each node's disk (module docstring)."""
    nodes = tuple(nodes)
    broken = [n for n in nodes if n.broke_contract]
    broke = "; ".join(f"disk {n.name} broke its contract: {n.summary}" for n in broken)
    if client is None:
        why = client_error or "the client's check produced no result"
        if broken and expected is not Outcome.LOSS_EXPECTED:
            return ClusterVerdict(Verdict.FAIL, f"{broke} (and {why})", expected, nodes)
        return ClusterVerdict(Verdict.ERROR, why, expected, nodes)
    explanation = explain_cluster(client, nodes)
    said = client.summary()
    if expected is Outcome.LOSS_EXPECTED:
        if client.loss:
            return ClusterVerdict(
                Verdict.PASS, f"loss detected as expected: {said}", expected, nodes, explanation
            )
        return ClusterVerdict(
            Verdict.FAIL,
            f"expected the cluster to lose acknowledged data, but the check saw none: {said}",
            expected,
            nodes,
        )
    if broken:
        return ClusterVerdict(Verdict.FAIL, broke, expected, nodes, explanation)
    if client.corruption or (client.loss and expected is Outcome.INTACT):
        return ClusterVerdict(
            Verdict.FAIL, f"acknowledged data lost: {said}", expected, nodes, explanation
        )
    cut = sum(1 for n in nodes if n.cut)
    note = f"; allowed loss: {said}" if client.loss else f": {said}"
    return ClusterVerdict(
        Verdict.PASS,
        f"inside the contract on {cut} of {len(nodes)} nodes cut{note}",
        expected,
        nodes,
        explanation,
    )
