"""Enumeration: the points, the states at each, their bounds, order and ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.durability.contract import CutPolicy, Promise
from harness.durability.cut import apply_cut
from harness.errors import ConfigError
from harness.explore.hostcheck import HostChecker, explore_host
from harness.explore.overlay import StateBuilder
from harness.explore.recording import Recording
from harness.explore.states import Bounds, PointKind, State, Timeline, enumerate_states

from .conftest import pattern

KiB = 1024


def workload(rec: Any, *, snapshots: bool = False) -> None:
    """Writes between flushes, a FUA write, overlapping rewrites, acks; snapshots at points."""
    rec.write(0, pattern(1))
    rec.write(8 * KiB, pattern(2))
    rec.flush()
    if snapshots:
        rec.snapshot()
    rec.ack("a1")
    rec.write(4 * KiB, pattern(3))
    rec.write(0, pattern(4))  # rewrites a durable block
    rec.write(64 * KiB, pattern(5, 8 * KiB), fua=True)
    if snapshots:
        rec.snapshot()
    rec.write(16 * KiB, pattern(6))
    rec.flush()
    rec.ack("a2")
    rec.write(4 * KiB, pattern(7))
    rec.write(20 * KiB, pattern(8, 12 * KiB))
    rec.write(0, pattern(9))
    if snapshots:
        rec.snapshot()


def timeline_of(recording: Recording, keep: Promise = Promise.FLUSHED) -> Timeline:
    return Timeline(recording.read_log(), keep, recording.acks)


def test_points_are_flushes_fua_writes_acks_and_the_end(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    kinds = [k for p in tl.points for k in p.kinds]
    assert kinds.count(PointKind.FLUSH) == 2
    assert kinds.count(PointKind.FUA) == 1
    assert kinds.count(PointKind.ACK) == 2
    assert tl.points[-1].kinds[-1] is PointKind.END
    assert [p.at for p in tl.points] == sorted({p.at for p in tl.points})
    assert [p.epoch for p in tl.points] == sorted(p.epoch for p in tl.points)


def test_pending_writes_follow_the_writeback_promise(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    end = tl.points[-1]
    # After the second flush: only the three writes after it are pending.
    assert [w.length for w in tl.pending(end)] == [4 * KiB, 12 * KiB, 4 * KiB]
    everything = timeline_of(rec.finish(), Promise.EVERY_COMPLETED)
    assert everything.pending(everything.points[-1]) == []
    nothing = timeline_of(rec.finish(), Promise.NOTHING)
    assert len(nothing.pending(nothing.points[-1])) == 9


def _image(builder: StateBuilder, state: State, out: Path) -> bytes:
    return builder.replay(state, out).read_bytes()


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "unsafe"])
def test_the_runners_lose_all_and_keep_all_cuts_are_explored_states(
    recorder: Any, tmp_path: Path, mode: str
) -> None:
    """At each snapshot moment, the offline cut of the real journal is one of the states."""
    rec = recorder(mode=mode)
    workload(rec, snapshots=True)
    recording = rec.finish()
    keep = {"writeback": Promise.FLUSHED, "writethrough": Promise.EVERY_COMPLETED}.get(
        mode, Promise.NOTHING
    )
    tl = timeline_of(recording, keep)
    states = list(enumerate_states(tl, Bounds(max_states=10_000, per_point=64)))
    with StateBuilder(tl, recording.log, recording.base) as builder:
        images = {_image(builder, s, tmp_path / "s.img") for s in states}
        for snap in rec.snapshots:
            # The snapshots follow a flush, a FUA write and the last write: the latest
            # point is that completion (the instant before it) or the end of the run.
            point = max((p for p in tl.points if p.at <= snap.records), key=lambda p: p.at)
            assert snap.records - point.at <= 1
            for policy in (CutPolicy.KEEP_ALL, CutPolicy.LOSE_ALL):
                cut_img = tmp_path / f"cut-{policy.value}.img"
                cut_img.write_bytes(snap.image.read_bytes())
                jr = tmp_path / "cut.journal"
                jr.write_bytes(snap.journal.read_bytes())
                apply_cut(cut_img, jr, policy, seed=1)
                content = cut_img.read_bytes()
                at_point = [s for s in states if s.point == point]
                assert any(_image(builder, s, tmp_path / "p.img") == content for s in at_point), (
                    f"{policy.value} cut at point {point.number} ({mode}) is not explored"
                )
                assert content in images


def test_every_state_is_inside_the_contract_it_was_enumerated_under(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    recording = rec.finish()
    for keep in (Promise.FLUSHED, Promise.EVERY_COMPLETED, Promise.NOTHING):
        tl = timeline_of(recording, keep)
        states = list(enumerate_states(tl, Bounds(max_states=10_000, per_point=32)))
        assert len(states) >= len(tl.points)
        with HostChecker(tl, recording.log, recording.base, keep, full_every=1) as hc:
            result = explore_host([hc], states)
        bad = [r.state.id for r in result.results if r.oracle is None or not r.oracle.ok]
        assert not bad, f"{keep}: states outside the contract: {bad}"


def test_lose_all_and_keep_all_at_every_point_come_first(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    states = list(enumerate_states(tl, Bounds(max_states=10_000, per_point=16)))
    head = states[: 2 * len(tl.points)]
    for p in tl.points:
        policies = {s.policy for s in head if s.point == p}
        assert CutPolicy.LOSE_ALL in policies
        if tl.pending(p):
            assert CutPolicy.KEEP_ALL in policies
    assert {s.policy for s in states} == set(CutPolicy)


def test_bounds_cap_states_per_point_kinds_and_policies(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    assert len(list(enumerate_states(tl, Bounds(max_states=5)))) == 5
    per = list(enumerate_states(tl, Bounds(max_states=1000, per_point=3)))
    assert max(sum(1 for s in per if s.point == p) for p in tl.points) == 3
    flushes = list(enumerate_states(tl, Bounds(kinds=(PointKind.FLUSH,))))
    assert {k for s in flushes for k in s.point.kinds} >= {PointKind.FLUSH}
    assert all(PointKind.FLUSH in s.point.kinds for s in flushes)
    torn = list(enumerate_states(tl, Bounds(policies=(CutPolicy.TORN,))))
    assert torn and all(s.policy is CutPolicy.TORN and s.torn for s in torn)
    only = list(enumerate_states(tl, Bounds(points=(tl.points[-1].number,))))
    assert {s.point.number for s in only} == {tl.points[-1].number}


@pytest.mark.parametrize(
    "kwargs", [{"max_states": 0}, {"per_point": 0}, {"policies": ()}, {"kinds": ()}]
)
def test_an_empty_budget_is_a_clear_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="at least"):
        Bounds(**kwargs)


def test_the_same_seed_gives_the_same_states_and_ids(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    a = list(enumerate_states(tl, Bounds(seed=3)))
    b = list(enumerate_states(tl, Bounds(seed=3)))
    c = list(enumerate_states(tl, Bounds(seed=4)))
    assert a == b
    assert len({s.id for s in a}) == len(a)
    assert [s.key for s in a] != [s.key for s in c]


def test_states_round_trip_through_json(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    for s in enumerate_states(tl, Bounds()):
        assert State.from_json(s.to_json(), tl) == s


def test_identical_images_share_one_content_hash(recorder: Any, tmp_path: Path) -> None:
    rec = recorder()
    workload(rec)
    recording = rec.finish()
    tl = timeline_of(recording)
    states = list(enumerate_states(tl, Bounds(max_states=10_000, per_point=32)))
    with StateBuilder(tl, recording.log, recording.base) as builder:
        by_hash: dict[str, bytes] = {}
        for s in states:
            digest = builder.view(s).digest
            content = _image(builder, s, tmp_path / "x.img")
            assert by_hash.setdefault(digest, content) == content
        assert len(by_hash) < len(states)  # several states do coincide
        assert len(set(by_hash.values())) == len(by_hash)


def test_a_tear_unit_tears_whole_units_only(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    torn = list(enumerate_states(tl, Bounds(policies=(CutPolicy.TORN,), tear_unit=4096)))
    assert torn
    for s in torn:
        for _seq, sectors in s.torn:
            groups = {sec // 8 for sec in sectors}
            assert len(sectors) == 8 * len(groups)


def test_tear_units_are_aligned_to_the_disk_not_to_the_write(recorder: Any) -> None:
    # A write from sector 3 to sector 26: the 4 KiB units it tears in are the disk's
    # (sectors 3-7, 8-15, 16-23, 24-26), never eight sectors counted from its first.
    rec = recorder()
    rec.write(3 * 512, pattern(1, 12 * KiB))
    rec.write(64 * KiB + 5 * 512, pattern(2, 6 * KiB))
    tl = timeline_of(rec.finish())
    bounds = Bounds(policies=(CutPolicy.TORN,), tear_unit=4096, per_point=64)
    torn = [t for s in enumerate_states(tl, bounds) for t in s.torn]
    assert torn
    writes = {w.seq: w for w in tl.writes}
    for seq, sectors in torn:
        w = writes[seq]
        first, end = w.offset // 512, (w.offset + w.length) // 512
        blocks = {sec // 8 for sec in sectors}
        whole = {sec for b in blocks for sec in range(b * 8, b * 8 + 8) if first <= sec < end}
        assert set(sectors) == whole, (seq, sectors)
    assert {sec // 8 for _seq, sectors in torn for sec in sectors} >= {0, 1, 2, 3}


def test_a_small_budget_reaches_every_point_before_going_deep(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = timeline_of(rec.finish())
    busy = [p for p in tl.points if len(tl.pending(p)) >= 2]
    canonical = sum(2 if tl.pending(p) else 1 for p in tl.points)
    head = list(enumerate_states(tl, Bounds(max_states=canonical + 3 * len(busy))))
    for p in busy:
        assert any(s.point == p and s.policy is CutPolicy.PREFIX for s in head)
