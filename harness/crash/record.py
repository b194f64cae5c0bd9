"""A cell's record: its identity, verdict and evidence as a `CellResult` for results.json.

The report renders these and decides nothing; what counts as acknowledged,
durable and lost comes from the checkers' own `Tally` (the oracle's in
sectors first, else the workload's) and from the verdict's expectation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.crash.cluster_verdict import ClusterVerdict
from harness.crash.verdict import CellVerdict, Observed, Outcome, Verdict, expected_for_cell
from harness.report.results import CellResult, CheckerResult, NodeResult, TimelineEvent
from harness.scenario.cells import Cell
from harness.workloads.base import Observation, Tally


def _tally(verdict: CellVerdict, observed: Observed) -> tuple[Tally | None, Outcome | None]:
    """The first checker (in the cell's order: the oracle first) that has figures."""
    for name, outcome in verdict.expected.checkers.items():
        observation = observed.get(name)
        if observation is not None and (tally := observation.tally()) is not None:
            return tally, outcome
    return None, None


def cell_result(
    cell: Cell,
    verdict: CellVerdict,
    observed: Observed,
    *,
    timings: Mapping[str, float] | None = None,
    artifacts: Mapping[str, str] | None = None,
    reproduce: str | None = None,
) -> CellResult:
    """The result of a cell that ran to a verdict: what the runner records."""
    expected = verdict.expected
    tally, outcome = _tally(verdict, observed)
    figures: dict[str, Any] = {}
    if tally is not None:
        durable = tally.durable
        if durable is None:
            durable = tally.acknowledged if outcome is Outcome.INTACT else 0
        figures = {
            "writes_acknowledged": tally.acknowledged,
            "writes_durable": durable,
            "lost": tally.lost,
            "corrupt": tally.corrupt,
            "loss_unit": tally.unit,
        }
    checkers = []
    for r in verdict.checkers:
        observation = observed.get(r.checker)
        checkers.append(
            CheckerResult(
                name=r.checker,
                expected=r.expected.value,
                verdict=r.verdict.value,
                loss_detected=r.loss_detected,
                reason=r.reason,
                details=observation.details() if observation is not None else {},
            )
        )
    return CellResult(
        **_identity(
            cell,
            expected.summary if expected.loss_must_be_detected else "contract",
            expected.promise.value,
        ),
        verdict=verdict.verdict.value,
        reason=verdict.reason,
        **figures,
        checkers=tuple(checkers),
        **_run_files(cell, timings, artifacts, reproduce),
        explanation=verdict.explanation,
    )


def cluster_result(
    cell: Cell,
    verdict: ClusterVerdict,
    client: Observation | None,
    *,
    nodes: tuple[NodeResult, ...],
    timeline: tuple[TimelineEvent, ...],
    timings: Mapping[str, float] | None = None,
    artifacts: Mapping[str, str] | None = None,
    reproduce: str | None = None,
) -> CellResult:
    """The result of a cluster cell: the client's figures, each node's disk, the time line.

    The checkers are the client's check and each node's oracle (`oracle@n2`),
    so a report that knows nothing of clusters still shows every verdict.
    """
    figures: dict[str, Any] = {}
    tally = client.tally() if client is not None else None
    if tally is not None:
        figures = {
            "writes_acknowledged": tally.acknowledged,
            "writes_durable": tally.acknowledged - tally.lost,
            "lost": tally.lost,
            "corrupt": tally.corrupt,
            "loss_unit": tally.unit,
        }
    checkers = []
    own = cell.workload.workload.checker
    if client is not None:
        checkers.append(
            CheckerResult(
                name=own,
                expected=verdict.expected.value,
                verdict=verdict.verdict.value,
                loss_detected=client.loss,
                reason=client.summary(),
                details=client.details(),
            )
        )
    for node in verdict.nodes:
        if node.disk is None:
            continue
        for r in node.disk.checkers:
            checkers.append(
                CheckerResult(
                    name=f"{r.checker}@{node.name}",
                    expected=r.expected.value,
                    verdict=r.verdict.value,
                    loss_detected=r.loss_detected,
                    reason=r.reason,
                )
            )
    expected = "loss detected" if verdict.expected is Outcome.LOSS_EXPECTED else "contract"
    return CellResult(
        **_identity(cell, expected, _cluster_promise(verdict)),
        verdict=verdict.verdict.value,
        reason=verdict.reason,
        **figures,
        checkers=tuple(checkers),
        **_run_files(cell, timings, artifacts, reproduce),
        explanation=verdict.explanation,
        nodes=nodes,
        timeline=timeline,
    )


def _cluster_promise(verdict: ClusterVerdict) -> str:
    """The promise in words: every node's, or each node's where they differ."""
    promises = {n.name: n.promise.value for n in verdict.nodes}
    if len(set(promises.values())) == 1:
        return next(iter(promises.values()))
    return "; ".join(f"{name}: {p}" for name, p in promises.items())


def error_result(
    cell: Cell,
    reason: str,
    *,
    verdict: Verdict = Verdict.ERROR,
    timings: Mapping[str, float] | None = None,
    artifacts: Mapping[str, str] | None = None,
    reproduce: str | None = None,
) -> CellResult:
    """The result of a cell that did not reach a verdict (harness error, Ctrl-C: skipped)."""
    expected = expected_for_cell(cell)
    return CellResult(
        **_identity(
            cell,
            "loss detected" if expected.loss_must_be_detected else "contract",
            expected.promise.value,
        ),
        verdict=verdict.value,
        reason=reason,
        **_run_files(cell, timings, artifacts, reproduce),
    )


def _run_files(
    cell: Cell,
    timings: Mapping[str, float] | None,
    artifacts: Mapping[str, str] | None,
    reproduce: str | None,
) -> dict[str, Any]:
    """How the run went: its timings, its files, and the command that runs it again."""
    return {
        "timings": dict(timings or {}),
        "artifacts": dict(artifacts or {}),
        "reproduce": reproduce if reproduce is not None else cell.reproduce_command(),
    }


def _identity(cell: Cell, expected: str, promise: str) -> dict[str, Any]:
    return {
        "id": cell.id,
        "scenario": cell.scenario,
        "scenario_path": cell.scenario_path,
        "mode": cell.mode.value,
        "fault": cell.fault.value,
        "policy": cell.policy.value if cell.policy else None,
        "policy_seed": cell.policy_seed,
        "workload": cell.workload.name,
        "workload_kind": cell.workload.kind,
        "cut": cell.cut.label,
        "cut_at": cell.cut_at,
        "repetition": cell.repetition,
        "seed": cell.seed,
        "expected": expected,
        "promise": promise,
    }
