"""The contract per mode and fault, and the comparison of observations with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.block.cache import CacheMode
from harness.crash.verdict import (
    Expected,
    Observed,
    OracleObservation,
    Outcome,
    Verdict,
    expected_for,
    expected_for_cell,
    judge,
    oracle_mode_for,
)
from harness.durability.contract import FaultModel, Promise, promise
from harness.durability.cut import CutPolicy
from harness.scenario.cells import expand
from harness.scenario.model import Expectation, WorkloadSpec
from harness.scenario.parse import load_scenario
from harness.workloads.ackrecords import (
    AckRecords,
    AckRecordsCheck,
    AckRecordsObservation,
    InvalidRecord,
    SyncMode,
)
from harness.workloads.filesystem import FsckObservation
from harness.workloads.fio_verify import FioVerify, FioVerifyObservation
from harness.workloads.fsmeta import FsMeta, FsMetaCheck, FsMetaFailure, FsMetaObservation

ROOT = Path(__file__).parents[3]
W, N, WT, DS, U = (
    CacheMode.WRITEBACK,
    CacheMode.NONE,
    CacheMode.WRITETHROUGH,
    CacheMode.DIRECTSYNC,
    CacheMode.UNSAFE,
)
HOST, GUEST, BACKEND = (
    FaultModel.HOST_POWER_CUT,
    FaultModel.GUEST_POWER_CUT,
    FaultModel.BACKEND_CRASH,
)
IN, AL, EX = Outcome.INTACT, Outcome.LOSS_ALLOWED, Outcome.LOSS_EXPECTED

ACK = WorkloadSpec(
    "ack-records",
    AckRecords(),
    ("oracle", "ack-records", "fsck"),
)
ACK_NOSYNC = WorkloadSpec(
    "ack-records",
    AckRecords(sync=SyncMode.NONE),
    ("oracle", "ack-records", "fsck"),
)
FIO = WorkloadSpec(
    "fio-verify",
    FioVerify((("fsync", 16),)),
    ("oracle", "fio-verify"),
)
FIO_SYNC = WorkloadSpec(
    "fio-verify",
    FioVerify((("fsync", 1),)),
    ("oracle", "fio-verify"),
)
FIO_BUFFERED = WorkloadSpec(
    "fio-verify",
    FioVerify((("direct", 0),)),
    ("oracle", "fio-verify"),
)
META = WorkloadSpec(
    "ext4-metadata",
    FsMeta(),
    ("oracle", "fsmeta", "fsck"),
)


@pytest.mark.parametrize(
    ("mode", "fault", "policy", "expected"),
    [
        (WT, HOST, CutPolicy.LOSE_ALL, Promise.EVERY_COMPLETED),
        (DS, HOST, CutPolicy.TORN, Promise.EVERY_COMPLETED),
        (W, HOST, CutPolicy.LOSE_ALL, Promise.FLUSHED),
        (N, HOST, CutPolicy.RANDOM, Promise.FLUSHED),
        (U, HOST, CutPolicy.PREFIX, Promise.NOTHING),
        (U, HOST, CutPolicy.KEEP_ALL, Promise.EVERY_COMPLETED),  # nothing reverted
        (U, GUEST, None, Promise.EVERY_COMPLETED),  # the host keeps its page cache
        (W, BACKEND, None, Promise.EVERY_COMPLETED),
    ],
)
def test_promise_per_mode_and_fault(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy | None, expected: Promise
) -> None:
    assert promise(mode, fault, policy) is expected


# (mode, fault, policy, workload, expect) -> {checker: outcome}, loss must be detected
TABLE = [
    (
        WT,
        HOST,
        CutPolicy.LOSE_ALL,
        ACK,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": IN, "fsck": IN},
        False,
    ),
    (
        DS,
        HOST,
        CutPolicy.LOSE_ALL,
        FIO,
        Expectation.CONTRACT,
        {"oracle": IN, "fio-verify": IN},
        False,
    ),
    (
        W,
        HOST,
        CutPolicy.LOSE_ALL,
        FIO,
        Expectation.CONTRACT,
        {"oracle": IN, "fio-verify": AL},
        False,
    ),  # writes after the last fsync may go
    (
        N,
        HOST,
        CutPolicy.LOSE_ALL,
        FIO_SYNC,
        Expectation.CONTRACT,
        {"oracle": IN, "fio-verify": IN},
        False,
    ),
    (
        W,
        HOST,
        CutPolicy.TORN,
        ACK,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": IN, "fsck": IN},
        False,
    ),
    (
        W,
        HOST,
        CutPolicy.LOSE_ALL,
        ACK_NOSYNC,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": AL, "fsck": IN},
        False,
    ),
    (
        U,
        HOST,
        CutPolicy.LOSE_ALL,
        ACK,
        Expectation.CONTRACT,
        {"oracle": EX, "ack-records": EX, "fsck": EX},
        True,
    ),
    (
        U,
        HOST,
        CutPolicy.RANDOM,
        FIO,
        Expectation.CONTRACT,
        {"oracle": AL, "fio-verify": AL},
        False,
    ),
    (
        U,
        GUEST,
        None,
        ACK,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": IN, "fsck": IN},
        False,
    ),
    (
        U,
        GUEST,
        None,
        FIO_BUFFERED,
        Expectation.CONTRACT,
        {"oracle": IN, "fio-verify": AL},
        False,
    ),  # fio's own page cache dies with the guest
    (
        W,
        GUEST,
        None,
        ACK_NOSYNC,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": AL, "fsck": IN},
        False,
    ),
    (
        W,
        BACKEND,
        None,
        ACK_NOSYNC,
        Expectation.CONTRACT,
        {"oracle": IN, "ack-records": IN, "fsck": IN},
        False,
    ),
    (
        W,
        HOST,
        CutPolicy.LOSE_ALL,
        META,
        Expectation.VIOLATION,
        {"oracle": EX, "fsmeta": EX, "fsck": EX},
        True,
    ),
]


@pytest.mark.parametrize(
    ("mode", "fault", "policy", "workload", "expect", "outcomes", "detect"), TABLE
)
def test_expected_outcome_per_checker(
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy | None,
    workload: WorkloadSpec,
    expect: Expectation,
    outcomes: dict[str, Outcome],
    detect: bool,
) -> None:
    e = expected_for(mode, fault, policy, workload, expect=expect)
    assert dict(e.checkers) == outcomes
    assert e.loss_must_be_detected is detect


def test_reference_contract_for_unsafe_is_what_flushes_promised() -> None:
    e = expected_for(U, HOST, CutPolicy.LOSE_ALL, ACK)
    assert e.promise is Promise.NOTHING and e.reference is Promise.FLUSHED
    assert e.oracle_mode == "writeback"
    assert expected_for(WT, HOST, CutPolicy.LOSE_ALL, ACK).oracle_mode == "writethrough"
    assert expected_for(W, GUEST, None, ACK).oracle_mode == "writethrough"


# ------------------------------------------------------------------ observations


def oracle(lost: int = 0, corrupt: int = 0, may: int = 0) -> OracleObservation:
    return OracleObservation(
        writes=100,
        writes_durable=60,
        sectors_checked=800,
        must=800 - lost - corrupt - may,
        may=may,
        lost=lost,
        corrupt=corrupt,
    )


def records(acked: int, found: int, valid: int | None = None) -> AckRecordsObservation:
    invalid = () if found >= acked else (InvalidRecord(found + 1, found * 4096, "zero"),)
    check = AckRecordsCheck(
        True,
        4096,
        found * 4096,
        found,
        valid if valid is not None else found,
        len(invalid),
        invalid,
    )
    return AckRecordsObservation(acked=acked, check=check)


def meta(acked: int, failures: int) -> FsMetaObservation:
    fails = tuple(FsMetaFailure(f"f{i:04d}", "present", "absent") for i in range(failures))
    return FsMetaObservation(acked, FsMetaCheck(acked, 32, 3, failures, fails))


CLEAN_FSCK = FsckObservation(mounted=True, exit_code=0)


def clean(workload: WorkloadSpec) -> Observed:
    return Observed(
        oracle=oracle(),
        fio_verify=FioVerifyObservation(0, 1000) if workload.kind == "fio-verify" else None,
        fsck=CLEAN_FSCK if "fsck" in workload.checkers else None,
        ack_records=records(200, 203) if workload.kind == "ack-records" else None,
        fsmeta=meta(150, 0) if workload.kind == "fs-metadata" else None,
        guest_io_errors=0,
    )


def test_writethrough_passes_when_every_acknowledged_record_is_found() -> None:
    v = judge(expected_for(WT, HOST, CutPolicy.LOSE_ALL, ACK), clean(ACK))
    assert v.verdict is Verdict.PASS and v.reason.startswith("inside the contract")


def test_writethrough_fails_when_an_acknowledged_record_is_lost() -> None:
    obs = Observed(oracle=oracle(), fsck=CLEAN_FSCK, ack_records=records(200, 150))
    v = judge(expected_for(WT, HOST, CutPolicy.LOSE_ALL, ACK), obs)
    assert v.verdict is Verdict.FAIL
    assert v.reason == (
        "ack-records: records 1..200 acknowledged, only 1..150 found "
        "(record 151 at offset 614400: zero) (the contract keeps every completed write)"
    )


def test_writeback_fails_when_the_oracle_finds_flushed_sectors_lost() -> None:
    obs = Observed(oracle=oracle(lost=8), fio_verify=FioVerifyObservation(3))
    v = judge(expected_for(W, HOST, CutPolicy.RANDOM, FIO), obs)
    assert v.verdict is Verdict.FAIL and v.reason.startswith("oracle: 8 sectors lost")


def test_writeback_allows_fio_to_lose_unflushed_writes() -> None:
    obs = Observed(oracle=oracle(), fio_verify=FioVerifyObservation(5, 900))
    v = judge(expected_for(W, HOST, CutPolicy.LOSE_ALL, FIO), obs)
    assert v.verdict is Verdict.PASS and "allowed loss: fio-verify" in v.reason


def test_lose_all_reports_the_unflushed_writes_it_reverted() -> None:
    obs = Observed(oracle=oracle(), fio_verify=FioVerifyObservation(0))
    v = judge(expected_for(N, HOST, CutPolicy.LOSE_ALL, FIO), obs)
    assert v.verdict is Verdict.PASS
    assert v.checkers[0].reason.endswith("lose-all reverted all 40 unflushed writes")


def test_oracle_mode_for_a_users_own_crash_test() -> None:
    assert oracle_mode_for(U, HOST, CutPolicy.LOSE_ALL) == "writeback"
    assert oracle_mode_for(N, HOST, CutPolicy.TORN) == "writeback"
    assert oracle_mode_for(DS, HOST, CutPolicy.LOSE_ALL) == "writethrough"
    assert oracle_mode_for(W, GUEST) == "writethrough"


def test_lose_all_must_revert_unflushed_data_in_writeback() -> None:
    obs = Observed(oracle=oracle(may=12), fio_verify=FioVerifyObservation(0))
    v = judge(expected_for(W, HOST, CutPolicy.LOSE_ALL, FIO), obs)
    assert v.verdict is Verdict.FAIL and "did not revert the volatile cache" in v.reason
    # Other policies may keep unflushed data.
    assert judge(expected_for(W, HOST, CutPolicy.RANDOM, FIO), obs).verdict is Verdict.PASS


def test_corruption_fails_even_where_loss_is_allowed() -> None:
    obs = Observed(oracle=oracle(corrupt=1), fio_verify=FioVerifyObservation(0))
    v = judge(expected_for(U, HOST, CutPolicy.RANDOM, FIO), obs)
    assert v.verdict is Verdict.FAIL and "1 corrupt" in v.reason


def test_unsafe_lose_all_passes_only_when_the_loss_is_detected() -> None:
    e = expected_for(U, HOST, CutPolicy.LOSE_ALL, ACK)
    caught = judge(
        e, Observed(oracle=oracle(lost=40), fsck=CLEAN_FSCK, ack_records=records(200, 0))
    )
    assert caught.verdict is Verdict.PASS
    assert caught.reason.startswith("loss detected as expected by oracle, ack-records")
    missed = judge(e, clean(ACK))
    assert missed.verdict is Verdict.FAIL and "no checker saw any" in missed.reason


def test_lying_flush_is_caught_by_fsck_alone() -> None:
    e = expected_for(W, HOST, CutPolicy.LOSE_ALL, META, expect=Expectation.VIOLATION)
    obs = Observed(oracle=oracle(), fsck=FsckObservation(True, 4), fsmeta=meta(150, 0))
    v = judge(e, obs)
    assert v.verdict is Verdict.PASS and "fsck" in v.reason


def test_fsck_failure_after_a_host_cut_fails_writeback() -> None:
    obs = Observed(oracle=oracle(), fsck=FsckObservation(True, 4), ack_records=records(10, 10))
    v = judge(expected_for(W, HOST, CutPolicy.LOSE_ALL, ACK), obs)
    assert v.verdict is Verdict.FAIL and "e2fsck -fn exited 4" in v.reason
    unmounted = Observed(
        oracle=oracle(), fsck=FsckObservation(False, 0), ack_records=records(10, 10)
    )
    assert (
        "did not mount" in judge(expected_for(W, HOST, CutPolicy.LOSE_ALL, ACK), unmounted).reason
    )


@pytest.mark.parametrize("code", [0, 1])
def test_fsck_exit_0_and_1_are_clean(code: int) -> None:
    obs = Observed(oracle=oracle(), fsck=FsckObservation(True, code), ack_records=records(10, 10))
    assert judge(expected_for(N, HOST, CutPolicy.LOSE_ALL, ACK), obs).verdict is Verdict.PASS


def test_fsmeta_failures_fail_the_contract() -> None:
    obs = Observed(oracle=oracle(), fsck=CLEAN_FSCK, fsmeta=meta(150, 2))
    v = judge(expected_for(N, HOST, CutPolicy.TORN, META), obs)
    assert (
        v.verdict is Verdict.FAIL and "2 files differ from 150 acknowledged operations" in v.reason
    )


def test_backend_crash_fails_on_guest_io_errors() -> None:
    e = expected_for(W, BACKEND, None, FIO)
    obs = Observed(oracle=oracle(), fio_verify=FioVerifyObservation(0), guest_io_errors=3)
    v = judge(e, obs)
    assert v.verdict is Verdict.FAIL and "3 I/O errors during the backend-crash" in v.reason
    assert judge(expected_for(W, GUEST, None, FIO), obs).verdict is Verdict.PASS


def test_missing_checker_result_is_an_error() -> None:
    v = judge(expected_for(W, HOST, CutPolicy.LOSE_ALL, ACK), Observed(oracle=oracle()))
    assert v.verdict is Verdict.ERROR and "produced no result" in v.reason


def test_a_violation_decides_the_cell_even_when_another_checker_could_not_run() -> None:
    # The filesystem did not mount, so ackrecords --check never ran.
    obs = Observed(oracle=oracle(), fsck=FsckObservation(False, 8))
    v = judge(expected_for(WT, HOST, CutPolicy.LOSE_ALL, ACK), obs)
    assert v.verdict is Verdict.FAIL and "did not mount" in v.reason
    assert "ack-records produced no result" in v.reason


def test_a_negative_control_passes_on_the_loss_it_could_see() -> None:
    obs = Observed(oracle=oracle(lost=100), fsck=FsckObservation(False, 8))
    v = judge(expected_for(U, HOST, CutPolicy.LOSE_ALL, ACK), obs)
    assert v.verdict is Verdict.PASS and v.reason.startswith(
        "loss detected as expected by oracle, fsck"
    )
    silent = judge(expected_for(U, HOST, CutPolicy.LOSE_ALL, ACK), Observed(oracle=oracle()))
    assert silent.verdict is Verdict.ERROR


def test_shipped_matrix_expectations_match_what_the_matrix_must_show() -> None:
    cells = expand(load_scenario(ROOT / "scenarios" / "matrix.toml"))
    for cell in cells:
        e = expected_for_cell(cell)
        if cell.mode in (WT, DS):
            assert set(e.checkers.values()) == {IN}, cell.id
        elif cell.mode in (W, N):
            assert e.checkers["oracle"] is IN and e.model_must_revert, cell.id
        else:
            assert e.loss_must_be_detected, cell.id
    for name in ("unsafe-loses-data", "lying-flush"):
        for cell in expand(load_scenario(ROOT / "scenarios" / f"{name}.toml")):
            assert expected_for_cell(cell).loss_must_be_detected


# ------------------------------------------------------------------ properties

modes = st.sampled_from(list(CacheMode))
faults = st.sampled_from(list(FaultModel))
policies = st.sampled_from(list(CutPolicy))
workloads = st.sampled_from([ACK, ACK_NOSYNC, FIO, FIO_SYNC, FIO_BUFFERED, META])
expects = st.sampled_from(list(Expectation))


def _expected(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy, w: WorkloadSpec, expect: Expectation
) -> Expected:
    return expected_for(mode, fault, policy if fault is HOST else None, w, expect=expect)


@given(modes, faults, policies, workloads, expects)
def test_nothing_lost_passes_every_contract_and_fails_every_negative_control(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy, w: WorkloadSpec, expect: Expectation
) -> None:
    e = _expected(mode, fault, policy, w, expect)
    v = judge(e, clean(w))
    assert v.verdict is (Verdict.FAIL if e.loss_must_be_detected else Verdict.PASS), v.reason


@given(modes, faults, policies, workloads, expects, st.integers(1, 1000))
def test_corruption_never_passes_a_contract_cell(
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy,
    w: WorkloadSpec,
    expect: Expectation,
    corrupt: int,
) -> None:
    e = _expected(mode, fault, policy, w, expect)
    obs = Observed.of({**clean(w).by_checker, "oracle": oracle(corrupt=corrupt)}, 0)
    v = judge(e, obs)
    assert v.verdict is Verdict.PASS if e.loss_must_be_detected else v.verdict is Verdict.FAIL


@given(modes, faults, policies, st.integers(1, 200), st.integers(0, 199))
def test_a_lost_acknowledged_record_fails_exactly_when_the_contract_covers_it(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy, acked: int, found: int
) -> None:
    found = min(found, acked - 1)
    e = _expected(mode, fault, policy, ACK, Expectation.CONTRACT)
    obs = Observed(oracle=oracle(), fsck=CLEAN_FSCK, ack_records=records(acked, found))
    v = judge(e, obs)
    if e.loss_must_be_detected or e.promise is Promise.NOTHING:
        assert v.verdict is Verdict.PASS
    else:
        assert v.verdict is Verdict.FAIL and v.reason.startswith("ack-records:")


@given(modes, faults, policies, workloads, expects)
def test_every_checker_verdict_has_a_one_line_reason(
    mode: CacheMode, fault: FaultModel, policy: CutPolicy, w: WorkloadSpec, expect: Expectation
) -> None:
    v = judge(_expected(mode, fault, policy, w, expect), clean(w))
    for r in (v, *v.checkers):
        assert r.reason and "\n" not in r.reason
