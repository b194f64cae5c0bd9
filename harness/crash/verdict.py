"""The verdict: is what a cell observed inside the contract of its cache mode?

Two steps, kept apart so each can be tested as a table:

1. `expected_for(...)` — from the mode, the fault, the policy, the workload
   and the scenario's `expect`, what each checker must report. The promise
   comes from design.md ("The durability contract"):

   | fault | promise |
   |---|---|
   | guest power cut, backend crash, host cut keep-all | every write the backend completed |
   | host power cut, writethrough / directsync | every completed write |
   | host power cut, writeback / none | writes completed before a completed flush started; FUA |
   | host power cut, unsafe | nothing |

   A backend crash kills no guest: every checker must find everything (also
   unsynced records and buffered fio writes), so the runner checks in the
   same boot or after a clean shutdown, never after killing QEMU.

   Checkers measure loss against a *reference* promise: the promise itself,
   or for unsafe the one the guest was given by its completed flushes, so a
   loss is visible even where it is allowed. A cell whose loss must be
   detected (a negative control, or unsafe under lose-all) passes only when
   at least one checker reports it.

2. `judge(expected, observed)` — each checker's observation against its
   expectation, then the cell: PASS, FAIL or ERROR, with a one-line reason.

The runner gives the oracle `expected.oracle_mode` as the mode to check
against (`harness.durability.oracle.check(image, log, expected.oracle_mode)`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from harness.block.cache import CacheMode
from harness.crash.matrix import Cell
from harness.crash.scenario import (
    AckRecordsSpec,
    Checker,
    Expectation,
    FaultModel,
    FioVerifySpec,
    SyncMode,
    WorkloadSpec,
)
from harness.crash.workloads.ackrecords import AckRecordsObservation
from harness.crash.workloads.fio import DEFAULTS as FIO_DEFAULTS
from harness.crash.workloads.fio import FioVerifyObservation
from harness.crash.workloads.fsmeta import FsMetaObservation
from harness.durability.contract import CutPolicy, Promise, promise, reference_promise
from harness.durability.oracle import OracleReport


class Outcome(enum.Enum):
    """What one checker must report."""

    INTACT = "intact"  # no loss, no corruption against the reference promise
    LOSS_ALLOWED = "loss-allowed"  # loss may be reported; content never written may not
    LOSS_EXPECTED = "loss-expected"  # negative control: the cell needs some checker to see loss


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"  # the cell could not be run or a checker produced nothing
    SKIPPED = "skipped"


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
    checkers: Mapping[Checker, Outcome]
    model_must_revert: bool  # lose-all: no unflushed data may survive (the model did its job)
    guest_io_errors_allowed: bool

    @property
    def oracle_mode(self) -> str:
        """The cache mode whose contract the oracle must check (its `mode` argument)."""
        return self.reference.mode_name

    @property
    def summary(self) -> str:
        if self.loss_must_be_detected:
            return "loss detected"
        return f"keeps {self.promise.value}"


def _fio_stable(params: FioVerifySpec, promise_: Promise) -> bool:
    """Whether every write fio completed is covered by the promise."""
    opts = {**FIO_DEFAULTS, **params.as_dict()}
    reaches_device = str(opts.get("direct", 0)) == "1" or params.syncs_every_write
    if promise_ is Promise.EVERY_COMPLETED:
        return reaches_device
    if promise_ is Promise.FLUSHED:
        return params.syncs_every_write
    return False


def expected_for(
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy | None,
    workload: WorkloadSpec,
    checkers: tuple[Checker, ...] | None = None,
    expect: Expectation = Expectation.CONTRACT,
) -> Expected:
    """The expectation for one cell (see the module docstring for the table)."""
    p = promise(mode, fault, policy)
    reference = reference_promise(mode, fault, policy)
    must_detect = expect is Expectation.VIOLATION or (
        p is Promise.NOTHING and policy is CutPolicy.LOSE_ALL
    )
    outcomes: dict[Checker, Outcome] = {}
    for checker in checkers if checkers is not None else workload.checkers:
        if must_detect:
            outcome = Outcome.LOSS_EXPECTED
        elif p is Promise.NOTHING:
            outcome = Outcome.LOSS_ALLOWED
        elif fault is FaultModel.BACKEND_CRASH:
            outcome = Outcome.INTACT  # the guest keeps its own cache: nothing at all may go
        elif checker is Checker.FIO_VERIFY:
            assert isinstance(workload.params, FioVerifySpec)
            outcome = Outcome.INTACT if _fio_stable(workload.params, p) else Outcome.LOSS_ALLOWED
        elif checker is Checker.ACK_RECORDS:
            assert isinstance(workload.params, AckRecordsSpec)
            synced = workload.params.sync is not SyncMode.NONE
            outcome = Outcome.INTACT if synced else Outcome.LOSS_ALLOWED
        else:  # oracle, fsck, fsmeta (fsmeta always syncs file and directory)
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
        model_must_revert=lossy and mode in (CacheMode.WRITEBACK, CacheMode.NONE, CacheMode.UNSAFE),
        guest_io_errors_allowed=fault is not FaultModel.BACKEND_CRASH,
    )


def expected_for_cell(cell: Cell) -> Expected:
    return expected_for(
        cell.mode, cell.fault, cell.policy, cell.workload, cell.checkers, cell.expect
    )


# ---------------------------------------------------------------- observations


@dataclass(frozen=True)
class OracleObservation:
    """The oracle's counts, checked against `Expected.oracle_mode`."""

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
        )


@dataclass(frozen=True)
class FsckObservation:
    mounted: bool  # the filesystem mounted (journal replay succeeded)
    exit_code: int  # e2fsck -fn: 0 clean, 1 fixed (not with -n), >= 2 damage left
    output_tail: str = ""

    @property
    def clean(self) -> bool:
        return self.mounted and self.exit_code in (0, 1)


@dataclass(frozen=True)
class Observed:
    """Everything the checkers saw in one cell; None where a checker did not run."""

    oracle: OracleObservation | None = None
    fio_verify: FioVerifyObservation | None = None
    fsck: FsckObservation | None = None
    ack_records: AckRecordsObservation | None = None
    fsmeta: FsMetaObservation | None = None
    guest_io_errors: int | None = None  # I/O errors the guest kernel logged (backend crash)


@dataclass(frozen=True)
class CheckerVerdict:
    checker: Checker
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

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


# ---------------------------------------------------------------- per checker


def _judge(
    outcome: Outcome, loss: bool, corrupt: bool, what: str, fine: str
) -> tuple[Verdict, str]:
    """The shared rule: INTACT fails on any loss, LOSS_ALLOWED only on corruption."""
    if outcome is Outcome.LOSS_EXPECTED:
        return Verdict.PASS, what if loss else fine
    if corrupt:
        return Verdict.FAIL, what
    if loss and outcome is Outcome.INTACT:
        return Verdict.FAIL, what
    return Verdict.PASS, what if loss else fine


def _oracle(expected: Expected, outcome: Outcome, o: OracleObservation) -> CheckerVerdict:
    loss = o.lost > 0 or o.corrupt > 0
    what = (
        f"{o.lost} sectors lost and {o.corrupt} corrupt of {o.sectors_checked} "
        f"({o.writes_durable} of {o.writes} writes durable by {expected.oracle_mode}'s contract)"
    )
    fine = f"all {o.sectors_checked} sectors inside {expected.oracle_mode}'s contract"
    verdict, reason = _judge(outcome, loss, o.corrupt > 0, what, fine)
    # A write that completed while the last flush ran may have reached the disk before it
    # at a lower layer, so only data completed after that flush counts against the model.
    left = o.may if o.unflushed is None else o.unflushed
    if (
        verdict is Verdict.PASS
        and expected.model_must_revert
        and not expected.loss_must_be_detected
        and left > 0
    ):
        verdict = Verdict.FAIL
        reason = (
            f"lose-all left {left} sectors with data newer than the last durable flush: "
            "the power cut did not revert the volatile cache"
        )
    elif verdict is Verdict.PASS and expected.model_must_revert and o.writes > o.writes_durable:
        reason += f"; lose-all reverted all {o.writes - o.writes_durable} unflushed writes"
    return CheckerVerdict(Checker.ORACLE, outcome, verdict, loss, reason)


def _fio(outcome: Outcome, o: FioVerifyObservation) -> CheckerVerdict:
    loss = o.verify_errors > 0
    what = f"fio verify found {o.verify_errors} bad blocks"
    if o.blocks_verified:
        what += f" of {o.blocks_verified}"
    if o.bad_offsets:
        what += f" (first at offset {min(o.bad_offsets)})"
    verdict, reason = _judge(outcome, loss, False, what, "fio verify found every completed block")
    return CheckerVerdict(Checker.FIO_VERIFY, outcome, verdict, loss, reason)


def _fsck(outcome: Outcome, o: FsckObservation) -> CheckerVerdict:
    loss = not o.clean
    if not o.mounted:
        what = "the filesystem did not mount (journal replay failed)"
    else:
        what = f"e2fsck -fn exited {o.exit_code}: the filesystem is damaged"
    verdict, reason = _judge(
        outcome, loss, False, what, f"mounted; e2fsck -fn exited {o.exit_code}"
    )
    return CheckerVerdict(Checker.FSCK, outcome, verdict, loss, reason)


def _ack_records(outcome: Outcome, o: AckRecordsObservation) -> CheckerVerdict:
    loss = o.missing > 0
    if loss:
        bad = o.check.first_invalid_after(o.found)
        where = f" (record {bad.seq} at offset {bad.offset}: {bad.reason})" if bad else ""
        what = f"records 1..{o.acked} acknowledged, only 1..{o.found} found{where}"
    else:
        what = f"all {o.acked} acknowledged records found ({o.check.valid} valid in the file)"
    verdict, reason = _judge(outcome, loss, False, what, what)
    return CheckerVerdict(Checker.ACK_RECORDS, outcome, verdict, loss, reason)


def _fsmeta(outcome: Outcome, o: FsMetaObservation) -> CheckerVerdict:
    loss = not o.check.ok
    if loss:
        first = o.check.failures[0] if o.check.failures else None
        detail = f"; {first.name}: expected {first.expected}, found {first.found}" if first else ""
        what = (
            f"{o.check.failure_count} files differ from {o.acked} acknowledged operations{detail}"
        )
    else:
        what = f"every effect of {o.acked} acknowledged operations found"
    verdict, reason = _judge(outcome, loss, False, what, what)
    return CheckerVerdict(Checker.FSMETA, outcome, verdict, loss, reason)


def _one(
    expected: Expected, checker: Checker, outcome: Outcome, observed: Observed
) -> CheckerVerdict:
    missing = CheckerVerdict(
        checker, outcome, Verdict.ERROR, False, f"{checker.value} produced no result"
    )
    if checker is Checker.ORACLE:
        return _oracle(expected, outcome, observed.oracle) if observed.oracle else missing
    if checker is Checker.FIO_VERIFY:
        return _fio(outcome, observed.fio_verify) if observed.fio_verify else missing
    if checker is Checker.FSCK:
        return _fsck(outcome, observed.fsck) if observed.fsck else missing
    if checker is Checker.ACK_RECORDS:
        return _ack_records(outcome, observed.ack_records) if observed.ack_records else missing
    return _fsmeta(outcome, observed.fsmeta) if observed.fsmeta else missing


# ---------------------------------------------------------------- per cell


def judge(expected: Expected, observed: Observed) -> CellVerdict:
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
            names = ", ".join(r.checker.value for r in detectors)
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
            f"{first.checker.value}: {first.reason} (the contract keeps {expected.promise.value})"
            f"{unavailable}",
            expected,
            results,
        )
    if errors:
        return CellVerdict(Verdict.ERROR, errors[0].reason, expected, results)
    lost = [r for r in results if r.loss_detected]
    note = f"; allowed loss: {lost[0].checker.value}: {lost[0].reason}" if lost else ""
    o = observed.oracle
    if expected.model_must_revert and o is not None and o.writes > o.writes_durable:
        note += f"; lose-all reverted all {o.writes - o.writes_durable} unflushed writes"
    return CellVerdict(
        Verdict.PASS, f"inside the contract ({expected.promise.value}){note}", expected, results
    )
