"""Enumeration under concurrent I/O, against a brute-force reference written from the contract.

Every other recording in these tests comes from the block stack driven one
request at a time, so completions are in submission order and no flush ever
overlaps a write: code that orders by submission instead of completion, or
lets a flush cover writes merely submitted before it, passes them all. These
logs overlap (`faults/concurrent.py`), and what each point, pending set,
state and image must be is derived from the contract's definition in the test
itself, never from what `Timeline` computed.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from faults.concurrent import S, Schedule, play, schedules  # tests/unit is on sys.path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.durability.contract import CutPolicy, Promise
from harness.durability.oracle import check as oracle_check
from harness.durability.writelog import WriteLog
from harness.errors import ConfigError
from harness.explore.hostcheck import log_as_of
from harness.explore.overlay import StateBuilder
from harness.explore.recording import Recording
from harness.explore.states import Bounds, State, Timeline, enumerate_states

ALL = Bounds(max_states=100_000, per_point=60)
PROMISES = [Promise.FLUSHED, Promise.EVERY_COMPLETED, Promise.NOTHING]


def timeline(sched: Schedule, rec: Recording, keep: Promise) -> Timeline:
    return Timeline(rec.read_log(), keep, rec.acks)


def kept_of(sched: Schedule, state: State) -> dict[int, set[int] | None]:
    """What the state keeps of each write submitted before its point (None: all of it)."""
    torn = {seq: set(lost) for seq, lost in state.torn}
    kept: dict[int, set[int] | None] = {}
    for w in sched.writes():
        if w.submit >= state.point.at or w.seq in state.lost:
            continue
        kept[w.seq] = set(w.sectors) - torn[w.seq] if w.seq in torn else None
    return kept


def assert_state_image(
    sched: Schedule,
    builder: StateBuilder,
    wlog: WriteLog,
    keep: Promise,
    state: State,
    scratch: Path,
) -> None:
    """The state's content is the contract's description of it, and the oracle agrees it is
    inside the promise it was enumerated under."""
    image = builder.view(state).read(0, len(sched.base))
    assert image == sched.reference_image(kept_of(sched, state), state.point.at), state.id
    scratch.write_bytes(image)
    report = oracle_check(scratch, log_as_of(wlog, state.point.at), keep)
    assert report.ok, (state.id, report.summary(), report.violations)


# -- named cases ------------------------------------------------------------------------


def test_a_flush_submitted_while_a_write_is_in_flight_does_not_cover_it(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    before = sched.write(0, b"b" * S)
    sched.complete(before)
    inflight = sched.write(4 * S, b"i" * S)
    flush = sched.flush()  # the write is still in flight when the flush starts
    sched.complete(inflight)  # ... and completes before the flush does
    sched.complete(flush)
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    end = tl.points[-1]
    assert [w.seq for w in tl.durable(end)] == [before]
    assert [w.seq for w in tl.pending(end)] == [inflight]
    states = list(enumerate_states(tl, Bounds(points=(end.number,))))
    assert any(inflight in s.lost for s in states)  # a cut may lose it: no flush covered it


def test_pending_writes_and_prefixes_follow_completion_order_not_submission(
    tmp_path: Path,
) -> None:
    sched = Schedule.new(tmp_path)
    a = sched.write(0, b"a" * S)
    b = sched.write(2 * S, b"b" * S)
    c = sched.write(4 * S, b"c" * S)
    d = sched.write(6 * S, b"d" * S)
    for seq in (c, a, d):  # completions out of submission order; b still in flight
        sched.complete(seq)
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    end = tl.points[-1]
    assert [w.seq for w in tl.pending(end)] == [c, a, d, b]
    prefixes = list(enumerate_states(tl, Bounds(policies=(CutPolicy.PREFIX,))))
    # Each prefix keeps the first k writes to complete (k = 1, 2, 3) and loses the rest.
    assert [s.lost for s in prefixes] == [
        tuple(sorted((a, d, b))),
        tuple(sorted((d, b))),
        (b,),
    ]
    with StateBuilder(tl, rec.log, rec.base) as builder:
        image = builder.view(prefixes[0]).read(0, len(sched.base))
    assert image == sched.reference_image(kept_of(sched, prefixes[0]), end.at)
    assert image[4 * S : 5 * S] == b"c" * S and image[:S] == sched.base[:S]


def test_a_flush_that_fails_covers_nothing_and_makes_no_point(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    w = sched.write(0, b"w" * S)
    sched.complete(w)
    sched.complete(sched.flush(), status=5)  # EIO
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    assert [p.at for p in tl.points] == [sched.records]
    assert [x.seq for x in tl.pending(tl.points[-1])] == [w]


def test_an_empty_write_is_nothing_a_cut_can_lose(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    w = sched.write(0, b"w" * S)
    sched.complete(w)
    sched.complete(sched.write(4 * S, b""))  # a guest may send one: it writes no sector
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    assert [x.seq for x in tl.writes] == [w]
    assert [x.seq for x in tl.pending(tl.points[-1])] == [w]


# -- the property -------------------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    steps=schedules(),
    keep=st.sampled_from(PROMISES),
    seed=st.integers(0, 2**16),
)
def test_enumeration_under_concurrent_io_matches_the_contract(
    steps: list[tuple[str, int, int, bool]], keep: Promise, seed: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="powercut-conc-") as tmp:
        sched = Schedule.new(Path(tmp), seed=seed)
        play(sched, steps, seed)
        rec = sched.finish()
        tl = timeline(sched, rec, keep)
        wlog = rec.read_log()
        ack_at = [a.index for a in rec.acks]
        assert [p.at for p in tl.points] == sched.reference_points(ack_at)
        by_seq = {w.seq: w for w in sched.writes()}
        states = list(enumerate_states(tl, ALL))
        prefix_only = list(enumerate_states(tl, replace(ALL, policies=(CutPolicy.PREFIX,))))
        for point in tl.points:
            pending = sched.reference_pending(keep, point.at)
            durable = {
                w.seq
                for w in sched.writes()
                if w.submit < point.at and sched.reference_durable(w, keep, point.at)
            }
            assert [w.seq for w in tl.pending(point)] == pending, point
            assert {w.seq for w in tl.durable(point)} == durable, point
            here = [s for s in states if s.point == point]
            losses = {s.lost for s in here if not s.torn}
            if pending:
                assert tuple(sorted(pending)) in losses  # lose-all
            assert () in losses  # keep-all
            for k in range(1, len(pending)):  # every ordered prefix, kept in completion order
                assert tuple(sorted(pending[k:])) in losses, (point, k)
            prefixes = [s.lost for s in prefix_only if s.point == point]
            assert prefixes == [tuple(sorted(pending[k:])) for k in range(1, len(pending))]
            for s in here:
                assert s.pending == len(pending), s.id
                assert set(s.lost) <= set(pending), s.id
                for seq, lost in s.torn:
                    assert seq in pending and seq not in s.lost, s.id
                    sectors = set(by_seq[seq].sectors)
                    assert lost and set(lost) < sectors, s.id  # torn: some kept, some lost
        # Every state's image is what the contract describes, and the oracle agrees it is
        # inside the promise it was enumerated under (a sample: images cost a file each).
        with StateBuilder(tl, rec.log, rec.base) as builder:
            for s in states[:: max(1, len(states) // 40)]:
                assert_state_image(sched, builder, wlog, keep, s, Path(tmp) / "s.img")


@pytest.mark.parametrize("keep", PROMISES)
def test_states_of_a_recording_with_every_kind_of_overlap(tmp_path: Path, keep: Promise) -> None:
    """One hand-written schedule with all the overlaps at once, every state's image checked."""
    sched = Schedule.new(tmp_path)
    w1 = sched.write(0, b"1" * 4 * S)
    w2 = sched.write(2 * S, b"2" * 4 * S, fua=True)  # overlaps w1, FUA
    f1 = sched.flush()
    sched.complete(w2)
    w3 = sched.write(8 * S, b"3" * 2 * S)
    sched.complete(w1)  # completes after the flush started: f1 does not cover it
    sched.ack("x")
    sched.complete(f1)
    sched.complete(w3)
    z = sched.zeroes(0, 2 * S)
    f2 = sched.flush()  # covers w1 and w3, not z (still in flight)
    sched.complete(f2)
    sched.complete(z)
    w4 = sched.write(12 * S, b"4" * S)  # in flight at the end
    rec = sched.finish()
    tl = timeline(sched, rec, keep)
    end = tl.points[-1]
    expected = {
        Promise.FLUSHED: [z, w4],
        Promise.EVERY_COMPLETED: [w4],
        Promise.NOTHING: [w2, w1, w3, z, w4],
    }[keep]
    assert [w.seq for w in tl.pending(end)] == expected
    wlog = rec.read_log()
    with StateBuilder(tl, rec.log, rec.base) as builder:
        states = list(enumerate_states(tl, ALL))
        for s in states:
            assert_state_image(sched, builder, wlog, keep, s, tmp_path / "s.img")
        # The standalone image `explore replay` writes holds the same content.
        last = states[-1]
        image = builder.replay(last, tmp_path / "r.img").read_bytes()
        assert image == sched.reference_image(kept_of(sched, last), last.point.at)


# -- states read back (explore.json, replay) ------------------------------------------------


def test_a_state_read_back_may_lose_only_what_was_pending_at_its_point(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    early = sched.write(0, b"e" * S)
    sched.complete(early)
    pending = sched.write(2 * S, b"p" * S)
    sched.complete(pending)
    sched.ack("1")  # the ack's point: every record before the write below
    late = sched.write(4 * S, b"l" * S)  # submitted exactly at the ack's point
    sched.complete(late)
    flush = sched.flush()
    sched.complete(flush)  # the last record: at the end `early`, `pending`, `late` are durable
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    ack = next(p for p in tl.points if "ack 1" in p.labels)
    end = tl.points[-1]
    assert end.at == sched.records and tl.by_seq[early].durable_at == end.at

    def raw(point: int, lost: list[int], **extra: Any) -> dict[str, Any]:
        return {
            "id": "s",
            "point": {"number": point, "at": tl.point(point).at},
            "lost": lost,
            "policy": "random",
            **extra,
        }

    state = State.from_json(raw(ack.number, [early, pending], pending=2), tl)
    assert state.lost == (early, pending) and state.torn == () and state.pending == 2
    for bad, point in ((late, ack), (early, end), (99, ack)):
        with pytest.raises(ConfigError, match=f"write {bad} is not pending at point"):
            State.from_json(raw(point.number, [bad]), tl)
    with pytest.raises(ConfigError, match=f"write {late} is not pending"):
        State.from_json(raw(ack.number, [], torn=[{"seq": late, "sectors_lost": [8]}]), tl)
    only = {"id": "t", "policy": "keep-all", "point": {"number": end.number, "at": end.at}}
    kept = State.from_json(only, tl)  # no losses recorded: it loses nothing
    assert (kept.lost, kept.torn, kept.pending) == ((), (), 0)
    with pytest.raises(ConfigError, match=f"no persistence point {len(tl.points)}"):
        tl.point(len(tl.points))
    with pytest.raises(ConfigError, match="no persistence point -1"):
        tl.point(-1)
    grown = state.with_loss([pending], [], "-min")
    assert grown.id == "s-min" and grown.pending == state.pending and grown.point == state.point


def test_the_smallest_budget_is_one_state_at_one_point_each(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    sched.complete(sched.write(0, b"a" * S))
    sched.write(S, b"b" * S)
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    assert len(list(enumerate_states(tl, Bounds(max_states=1)))) == 1
    one_each = list(enumerate_states(tl, Bounds(per_point=1)))
    assert len(one_each) == len(tl.points) and len({s.point for s in one_each}) == len(tl.points)
    for bad in ({"max_states": 0}, {"per_point": 0}):
        with pytest.raises(ConfigError, match="at least 1"):
            Bounds(**bad)  # type: ignore[arg-type]


def test_budgets_are_kept_exactly_and_torn_writes_tear_by_sector(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path)
    for i in range(6):  # six writes of two sectors each, none ever flushed
        sched.complete(sched.write(4 * i * S, bytes([i + 1]) * 2 * S))
    rec = sched.finish()
    tl = timeline(sched, rec, Promise.FLUSHED)
    end = tl.points[-1]
    assert len(list(enumerate_states(tl, Bounds(max_states=3)))) == 3
    for per_point in (2, 5, 9):
        got = list(enumerate_states(tl, Bounds(per_point=per_point, points=(end.number,))))
        assert len(got) == per_point
    torn = [
        s
        for s in enumerate_states(tl, Bounds(per_point=60, policies=(CutPolicy.TORN,)))
        if s.point == end
    ]
    assert torn
    for s in torn:
        for seq, lost in s.torn:
            first = tl.by_seq[seq].offset // S
            assert len(lost) == 1 and lost[0] in (first, first + 1)  # one sector of two
    # A torn state loses some of the other pending writes and keeps others.
    assert any(0 < len(s.lost) < 6 - len(s.torn) for s in torn)
    assert any(len(s.lost) + len(s.torn) < 6 for s in torn)
