"""The verdict: is what a cell observed inside the contract of its cache mode?

Two steps, kept apart so each can be tested as a table:

1. `expected_for(...)` — from the mode, the fault, the policy, the workload
   and the scenario's `expect`, what each checker must report. The promise
   is the contract's (`harness.durability.contract.promise`); whether a
   workload's own acknowledgements are covered by it is the workload's to
   say (`Workload.keeps_acknowledged`).

   A backend crash kills no guest: every checker must find everything (also
   unsynced records and buffered fio writes), so the runner checks in the
   same boot or after a clean shutdown, never after killing QEMU.

   Checkers measure loss against a *reference* promise: the promise itself,
   or for unsafe the one the guest was given by its completed flushes, so a
   loss is visible even where it is allowed. A cell whose loss must be
   detected (a negative control, or unsafe under lose-all) passes only when
   at least one checker reports it.

2. `judge(expected, observed)` — each checker's `Observation` against its
   expectation, then the cell: PASS, FAIL or ERROR, with a one-line reason.

The runner gives the oracle `expected.reference` as the promise to check
(`harness.durability.oracle.check(image, log, expected.reference)`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    Promise,
    host_cut_promise,
    promise,
    reference_promise,
)
from harness.durability.oracle import OracleReport
from harness.report.results import Verdict
from harness.scenario.cells import Cell
from harness.scenario.model import Expectation, WorkloadSpec
from harness.workloads.base import FSCK, ORACLE, Observation, Tally

__all__ = [
    "CellVerdict",
    "CheckerVerdict",
    "Expected",
    "Observed",
    "OracleObservation",
    "Outcome",
    "Verdict",
    "expected_for",
    "expected_for_cell",
    "judge",
    "oracle_mode_for",
]


class Outcome(enum.Enum):
    """What one checker must report."""

    INTACT = "intact"  # no loss, no corruption against the reference promise
    LOSS_ALLOWED = "loss-allowed"  # loss may be reported; content never written may not
    LOSS_EXPECTED = "loss-expected"  # negative control: the cell needs some checker to see loss


def oracle_mode_for(mode: CacheMode, fault: FaultModel, policy: CutPolicy | None = None) -> str:
    """The name of the contract the oracle checks for a cell (or a user's own crash test)."""
    return reference_promise(mode, fault, policy).mode_name


@dataclass(frozen=True)
class Expected:
    mode: CacheMode
    fault: FaultModel
    policy: CutPolicy | None
    promise: Promise  # what the mode promises across this fault
    reference: Promise  # what checkers measure loss against
    loss_must_be_detected: bool
    checkers: Mapping[str, Outcome]
    model_must_revert: bool  # lose-all: no unflushed data may survive (the model did its job)
    guest_io_errors_allowed: bool

    @property
    def oracle_mode(self) -> str:
        """How the oracle's contract is named: the cache mode whose promise it checks."""
        return self.reference.mode_name

    @property
    def summary(self) -> str:
        if self.loss_must_be_detected:
            return "loss detected"
        return f"keeps {self.promise.value}"


def expected_for(
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy | None,
    workload: WorkloadSpec,
    checkers: tuple[str, ...] | None = None,
    expect: Expectation = Expectation.CONTRACT,
) -> Expected:
    """The expectation for one cell (see the module docstring)."""
    p = promise(mode, fault, policy)
    reference = reference_promise(mode, fault, policy)
    must_detect = expect is Expectation.VIOLATION or (
        p is Promise.NOTHING and policy is CutPolicy.LOSE_ALL
    )
    outcomes: dict[str, Outcome] = {}
    for checker in checkers if checkers is not None else workload.checkers:
        if must_detect:
            outcome = Outcome.LOSS_EXPECTED
        elif p is Promise.NOTHING:
            outcome = Outcome.LOSS_ALLOWED
        elif fault is FaultModel.BACKEND_CRASH:
            outcome = Outcome.INTACT  # the guest keeps its own cache: nothing at all may go
        elif checker == workload.workload.checker:
            kept = workload.workload.keeps_acknowledged(p)
            outcome = Outcome.INTACT if kept else Outcome.LOSS_ALLOWED
        else:  # the oracle and the filesystem's checker judge what the contract keeps
            outcome = Outcome.INTACT
        outcomes[checker] = outcome
    lossy = fault is FaultModel.HOST_POWER_CUT and policy is CutPolicy.LOSE_ALL
    return Expected(
        mode=mode,
        fault=fault,
        policy=policy,
        promise=p,
        reference=reference,
        loss_must_be_detected=must_detect,
        checkers=outcomes,
        model_must_revert=lossy and host_cut_promise(mode) is not Promise.EVERY_COMPLETED,
        guest_io_errors_allowed=fault is not FaultModel.BACKEND_CRASH,
    )


def expected_for_cell(cell: Cell) -> Expected:
    return expected_for(
        cell.mode, cell.fault, cell.policy, cell.workload, cell.checkers, cell.expect
    )


# ---------------------------------------------------------------- observations


@dataclass(frozen=True)
class OracleObservation(Observation):
    """The oracle's counts, checked against the reference promise (`contract` names it)."""

    writes: int  # completed writes in the log
    writes_durable: int  # of those, durable by the reference promise
    sectors_checked: int
    must: int  # sectors holding exactly what the promise requires
    may: int  # sectors holding a later, not yet durable version (allowed)
    lost: int  # sectors holding an older version than the promise requires
    corrupt: int  # sectors holding content no write gave them
    # Of `may`, sectors holding a write that completed after the last flush had completed
    # (OracleReport.unflushed); None when unknown, and then `may` stands in for it.
    unflushed: int | None = None
    contract: str = "writeback"  # the cache mode whose contract was checked (Promise.mode_name)
    flushes: int = 0  # flushes the guest sent that completed
    fua_writes: int = 0  # completed writes the guest sent with FUA

    @classmethod
    def from_report(cls, report: OracleReport) -> OracleObservation:
        return cls(
            writes=report.writes_completed,
            writes_durable=report.writes_durable,
            sectors_checked=report.sectors_checked,
            must=report.must,
            may=report.may,
            lost=report.lost,
            corrupt=report.corrupt,
            unflushed=report.unflushed,
            contract=report.mode,
            flushes=report.flushes_completed,
            fua_writes=report.fua_writes,
        )

    @property
    def loss(self) -> bool:
        return self.lost > 0 or self.corrupt > 0

    @property
    def corruption(self) -> bool:
        return self.corrupt > 0

    def summary(self) -> str:
        if self.loss:
            return (
                f"{self.lost} sectors lost and {self.corrupt} corrupt of {self.sectors_checked} "
                f"({self.writes_durable} of {self.writes} writes durable by {self.contract}'s "
                "contract)"
            )
        return f"all {self.sectors_checked} sectors inside {self.contract}'s contract"

    def tally(self) -> Tally:
        return Tally(
            acknowledged=self.writes,
            durable=self.writes_durable,
            lost=self.lost,
            corrupt=self.corrupt,
            unit="sectors",
        )

    @property
    def unflushed_left(self) -> int:
        return self.may if self.unflushed is None else self.unflushed


class Observed:
    """Everything the checkers saw in one cell, by checker name; missing ones did not run.

    `Observed(oracle=..., ack_records=...)` names checkers as keywords
    (`_` for `-`); `Observed.of({"ack-records": ...})` takes any names.
    """

    def __init__(
        self, guest_io_errors: int | None = None, **by_checker: Observation | None
    ) -> None:
        self.by_checker: dict[str, Observation] = {
            name.replace("_", "-"): obs for name, obs in by_checker.items() if obs is not None
        }
        # I/O errors the guest kernel logged (backend crash); None when not looked at.
        self.guest_io_errors = guest_io_errors

    @classmethod
    def of(
        cls, observations: Mapping[str, Observation], guest_io_errors: int | None = None
    ) -> Observed:
        observed = cls(guest_io_errors)
        observed.by_checker.update(observations)
        return observed

    def get(self, checker: str) -> Observation | None:
        return self.by_checker.get(checker)

    @property
    def oracle(self) -> OracleObservation | None:
        obs = self.by_checker.get(ORACLE)
        return obs if isinstance(obs, OracleObservation) else None

    def __getattr__(self, name: str) -> Any:
        # `observed.ack_records`: the observation of checker "ack-records", or None.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.__dict__.get("by_checker", {}).get(name.replace("_", "-"))


@dataclass(frozen=True)
class CheckerVerdict:
    checker: str
    expected: Outcome
    verdict: Verdict
    loss_detected: bool
    reason: str


@dataclass(frozen=True)
class CellVerdict:
    verdict: Verdict
    reason: str
    expected: Expected
    checkers: tuple[CheckerVerdict, ...] = field(default=())
    explanation: str = ""  # who lost what, when a workload's data went missing (`explain`)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


# ---------------------------------------------------------------- per checker


def _judge(outcome: Outcome, observation: Observation) -> tuple[Verdict, str]:
    """The shared rule: INTACT fails on any loss, LOSS_ALLOWED only on corruption."""
    what = observation.summary()
    if outcome is Outcome.LOSS_EXPECTED:
        return Verdict.PASS, what
    if observation.corruption or (observation.loss and outcome is Outcome.INTACT):
        return Verdict.FAIL, what
    return Verdict.PASS, what


def _oracle_rule(
    expected: Expected, verdict: Verdict, reason: str, o: OracleObservation
) -> tuple[Verdict, str]:
    """The model's own duty under lose-all: nothing newer than the last durable flush survives.

    A write that completed while the last flush ran may have reached the
    disk before it at a lower layer, so only data completed after that
    flush counts against the model.
    """
    if verdict is not Verdict.PASS or not expected.model_must_revert:
        return verdict, reason
    if not expected.loss_must_be_detected and o.unflushed_left > 0:
        return Verdict.FAIL, (
            f"lose-all left {o.unflushed_left} sectors with data newer than the last durable "
            "flush: the power cut did not revert the volatile cache"
        )
    if o.writes > o.writes_durable:
        reason += f"; lose-all reverted all {o.writes - o.writes_durable} unflushed writes"
    return verdict, reason


def _one(expected: Expected, checker: str, outcome: Outcome, observed: Observed) -> CheckerVerdict:
    observation = observed.get(checker)
    if observation is None:
        return CheckerVerdict(
            checker, outcome, Verdict.ERROR, False, f"{checker} produced no result"
        )
    verdict, reason = _judge(outcome, observation)
    if isinstance(observation, OracleObservation):
        verdict, reason = _oracle_rule(expected, verdict, reason, observation)
    return CheckerVerdict(checker, outcome, verdict, observation.loss, reason)


# ---------------------------------------------------------------- per cell


def judge(expected: Expected, observed: Observed) -> CellVerdict:
    """Compare what the checkers observed with what the cell expected, and explain a loss."""
    verdict = _judge_cell(expected, observed)
    explanation = explain(expected, observed, verdict.checkers)
    return dataclasses.replace(verdict, explanation=explanation) if explanation else verdict


def explain(expected: Expected, observed: Observed, results: tuple[CheckerVerdict, ...]) -> str:
    """Who lost the data, in words, when a workload's checker found acknowledged data missing.

    The oracle says whether the *disk* kept its contract. If it did, the loss
    is the application's (or its filesystem configuration's): it acknowledged
    what it never made durable. If it did not, the disk broke its promise.
    """
    lost = [r for r in results if r.loss_detected and r.checker not in (ORACLE, FSCK)]
    if not lost:
        return ""
    workload = observed.get(lost[0].checker)
    tally = workload.tally() if workload is not None else None
    figures = (
        f"{tally.acknowledged} {tally.unit} acknowledged, "
        f"{tally.acknowledged - tally.lost} found, {tally.lost} lost"
        if tally is not None
        else lost[0].reason
    )
    o = observed.oracle
    if o is None:
        return (
            f"{lost[0].checker} found acknowledged data missing ({figures}); the oracle did "
            "not run, so whether the disk kept its contract is unknown"
        )
    sent = f"the guest sent {o.flushes} flushes and {o.fua_writes} FUA writes"
    durable = f"{o.writes_durable} of {o.writes} writes were durable by {o.contract}'s contract"
    if o.loss and expected.promise is Promise.NOTHING:
        return (
            f"the disk lost data the guest saw flushed, as cache=unsafe may (its flushes never "
            f"reach stable storage): {o.lost} sectors lost against what the completed flushes "
            f"promised ({durable}; {sent}); the application's loss follows from it ({figures})"
        )
    if o.loss:
        return (
            f"the disk broke its contract: {o.lost} sectors lost and {o.corrupt} corrupt "
            f"against {o.contract}'s contract ({durable}; {sent}); "
            f"the application's loss follows from it ({figures})"
        )
    return (
        "the disk kept its contract, so the application (or its filesystem configuration) "
        f"acknowledged data it never made durable: {sent}; {durable}; {figures}"
    )


def _judge_cell(expected: Expected, observed: Observed) -> CellVerdict:
    """Compare what the checkers observed with what the cell expected.

    Evidence beats silence: a checker that saw a violation (or, in a negative
    control, the loss) decides the cell even when another checker produced
    nothing — after a filesystem is lost, the workload's own check cannot run.
    A cell is ERROR only when the missing results could have changed it.
    """
    results = tuple(_one(expected, c, o, observed) for c, o in expected.checkers.items())
    errors = [r for r in results if r.verdict is Verdict.ERROR]
    unavailable = f" ({'; '.join(r.reason for r in errors)})" if errors else ""

    if expected.loss_must_be_detected:
        detectors = [r for r in results if r.loss_detected]
        if detectors:
            names = ", ".join(r.checker for r in detectors)
            return CellVerdict(
                Verdict.PASS,
                f"loss detected as expected by {names}: {detectors[0].reason}{unavailable}",
                expected,
                results,
            )
        if errors:
            return CellVerdict(Verdict.ERROR, errors[0].reason, expected, results)
        return CellVerdict(
            Verdict.FAIL,
            f"expected the loss to be detected, but no checker saw any "
            f"({'; '.join(r.reason for r in results) or 'no checkers'})",
            expected,
            results,
        )

    if not expected.guest_io_errors_allowed and observed.guest_io_errors:
        return CellVerdict(
            Verdict.FAIL,
            f"guest saw {observed.guest_io_errors} I/O errors during the {expected.fault.value}",
            expected,
            results,
        )
    failures = [r for r in results if r.verdict is Verdict.FAIL]
    if failures:
        first = failures[0]
        return CellVerdict(
            Verdict.FAIL,
            f"{first.checker}: {first.reason} (the contract keeps {expected.promise.value})"
            f"{unavailable}",
            expected,
            results,
        )
    if errors:
        return CellVerdict(Verdict.ERROR, errors[0].reason, expected, results)
    lost = [r for r in results if r.loss_detected]
    note = f"; allowed loss: {lost[0].checker}: {lost[0].reason}" if lost else ""
    o = observed.oracle
    if expected.model_must_revert and o is not None and o.writes > o.writes_durable:
        note += f"; lose-all reverted all {o.writes - o.writes_durable} unflushed writes"
    return CellVerdict(
        Verdict.PASS, f"inside the contract ({expected.promise.value}){note}", expected, results
    )
