"""Disks that keep less than they promised: exploration must find states that break the promise.

The states are enumerated by what the disk actually keeps (`keep`), and judged
by what the guest was told (the oracle, `judge`): unsafe's flushes never reach
the disk, nor do a lying disk's (blkdebug `lying-flush`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    Promise,
    reference_promise,
)
from harness.durability.cut import apply_cut
from harness.explore.doc import StateVerdict
from harness.explore.hostcheck import HostChecker, explore_host
from harness.explore.overlay import StateBuilder
from harness.explore.states import Bounds, Timeline, enumerate_states

from .conftest import pattern


def acked_records(rec: Any, n: int = 6) -> None:
    """An application appending records with fsync: write, flush, ack."""
    for i in range(n):
        rec.write(i * 4096, pattern(100 + i))
        rec.flush()
        rec.ack(str(i))


def _explore(recording: Any, keep: Promise, judge: Promise) -> Any:
    tl = Timeline(recording.read_log(), keep, recording.acks)
    states = list(enumerate_states(tl, Bounds(max_states=100)))
    with HostChecker(tl, recording.log, recording.base, judge) as hc:
        return explore_host([hc], states)


def test_unsafe_loses_fsynced_records_within_the_first_hundred_states(recorder: Any) -> None:
    rec = recorder(mode="unsafe")
    acked_records(rec)
    recording = rec.finish()
    # What its flushes told the guest:
    judge = reference_promise(CacheMode.UNSAFE, FaultModel.HOST_POWER_CUT)
    assert judge is Promise.FLUSHED
    result = _explore(recording, Promise.NOTHING, judge)
    failing = result.failing
    assert failing and all(r.verdict is StateVerdict.VIOLATION for r in failing)
    assert any(r.state.policy is CutPolicy.LOSE_ALL for r in failing)


def test_the_same_run_under_its_promise_has_no_failing_state(recorder: Any) -> None:
    rec = recorder(mode="writeback")
    acked_records(rec)
    recording = rec.finish()
    result = _explore(recording, Promise.FLUSHED, Promise.FLUSHED)
    assert result.explored > 6 and not result.failing


def test_a_lying_flush_is_caught(recorder: Any, tmp_path: Path) -> None:
    rec = recorder(mode="writeback", blkdebug="flush:lying-flush")
    acked_records(rec)
    rec.snapshot()
    recording = rec.finish()
    result = _explore(recording, Promise.NOTHING, Promise.FLUSHED)
    assert result.failing
    assert any(r.oracle is not None and r.oracle.lost for r in result.failing)
    # The disk model is right: what the real journal loses is one of the explored states.
    snap = rec.snapshots[0]
    apply_cut(snap.image, snap.journal, CutPolicy.LOSE_ALL, seed=0)
    tl = Timeline(recording.read_log(), Promise.NOTHING, recording.acks)
    with StateBuilder(tl, recording.log, recording.base) as builder:
        end = [s for s in enumerate_states(tl, Bounds()) if s.point == tl.points[-1]]
        images = {builder.replay(s, tmp_path / "x.img").read_bytes() for s in end}
    assert snap.image.read_bytes() in images


def test_the_disk_promise_of_unsafe_and_of_a_lying_disk_is_nothing() -> None:
    from harness.explore.states import disk_promise

    assert disk_promise(CacheMode.UNSAFE) is Promise.NOTHING
    assert disk_promise(CacheMode.WRITEBACK, lying_flush=True) is Promise.NOTHING
    assert disk_promise(CacheMode.WRITEBACK) is Promise.FLUSHED
    assert disk_promise(CacheMode.DIRECTSYNC) is Promise.EVERY_COMPLETED


def test_an_interrupted_exploration_keeps_what_it_checked(recorder: Any) -> None:
    import pytest

    rec = recorder(mode="writeback")
    acked_records(rec, 12)
    recording = rec.finish()
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    states = list(enumerate_states(tl, Bounds(max_states=200)))
    seen: list[Any] = []

    def on_result(result: Any) -> None:
        seen.append(result)
        if len(seen) == 5:
            raise KeyboardInterrupt

    checkers = [HostChecker(tl, recording.log, recording.base, Promise.FLUSHED) for _ in range(2)]
    try:
        with pytest.raises(KeyboardInterrupt):
            explore_host(checkers, states, on_result=on_result)
    finally:
        for hc in checkers:
            hc.close()
    assert 5 <= len(seen) < len(states)
    assert all(not hc.scratch.path.exists() for hc in checkers)
