"""The oracle on logs with concurrent I/O, against a brute-force reference of its contract.

The block stack's own logs are sequential (`concurrent.py` says why), so
these are written record by record: a flush submitted while a write is in
flight, completions out of submission order, writes still in flight at the cut,
failed requests. For every sector the reference lists what the contract allows
(the newest durable write's content, any write not finished before it started,
the initial content only where no write is durable) and calls anything else
lost (an older version) or corrupt (no version at all); the oracle must agree,
sector count by sector count, on any image.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.durability.contract import CacheMode, Promise
from harness.durability.oracle import check
from harness.durability.writelog import Op

from .concurrent import Req, S, Schedule, play, schedules

PROMISES = [Promise.FLUSHED, Promise.EVERY_COMPLETED, Promise.NOTHING]


def _flush_while_in_flight(tmp: Path) -> tuple[Schedule, int, int]:
    sched = Schedule.new(tmp)
    before = sched.write(0, b"b" * S)
    sched.complete(before)
    inflight = sched.write(4 * S, b"i" * S)
    flush = sched.flush()  # submitted while the write is in flight
    sched.complete(inflight)  # which completes before the flush does
    sched.complete(flush)
    sched.finish()
    return sched, before, inflight


def _image(sched: Schedule, path: Path, sectors: dict[int, bytes]) -> Path:
    image = bytearray(sched.base)
    for s, data in sectors.items():
        image[s * S : (s + 1) * S] = data
    path.write_bytes(image)
    return path


def test_a_flush_covers_only_writes_completed_before_it_started(tmp_path: Path) -> None:
    sched, before, inflight = _flush_while_in_flight(tmp_path / "log")
    # The host lost the write that was in flight when the flush started: allowed.
    lost_inflight = _image(sched, tmp_path / "a.img", {0: b"b" * S})
    report = check(lost_inflight, sched.log, CacheMode.WRITEBACK)
    assert report.ok, report.violations
    assert (report.writes_durable, report.must, report.lost) == (1, 2, 0)
    # Losing the write that completed before the flush started breaks the promise.
    lost_before = _image(sched, tmp_path / "b.img", {4: b"i" * S})
    report = check(lost_before, sched.log, CacheMode.WRITEBACK)
    assert not report.ok and report.lost == 1
    assert [(v.sector, v.expected_seq, v.found_seq) for v in report.violations] == [(0, before, 0)]
    # Under writethrough every completed write is owed: losing the in-flight one is lost.
    report = check(lost_inflight, sched.log, CacheMode.WRITETHROUGH)
    assert report.lost == 1 and report.violations[0].expected_seq == inflight


def test_a_later_write_still_in_flight_may_replace_a_durable_one(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path / "log")
    old = sched.write(0, b"o" * S)
    sched.complete(old)
    sched.complete(sched.flush())
    sched.write(0, b"n" * S)  # in flight at the cut
    sched.finish()
    for content, ok in ((b"o" * S, True), (b"n" * S, True), (sched.base[:S], False)):
        report = check(
            _image(sched, tmp_path / "i.img", {0: content}), sched.log, CacheMode.WRITEBACK
        )
        assert report.ok is ok, (content[:1], report.summary())
    report = check(_image(sched, tmp_path / "i.img", {0: b"?" * S}), sched.log, CacheMode.WRITEBACK)
    assert report.corrupt == 1 and report.violations[0].kind == "corrupt"


# -- the reference -------------------------------------------------------------------------


def _content(req: Req, sector: int) -> bytes:
    return req.sector_data(sector)


def reference(sched: Schedule, image: bytes, keep: Promise) -> Counter[str]:
    """Each sector any request wrote, classified by the contract's definition."""
    counts: Counter[str] = Counter()
    writes = sched.writes()
    touched = sorted({s for w in writes for s in w.sectors})
    for s in touched:
        found = image[s * S : (s + 1) * S]
        initial = sched.base[s * S : (s + 1) * S]
        versions = [w for w in writes if s in w.sectors]  # submission order
        durable = [w for w in versions if sched.reference_durable(w, keep)]
        newest = max(durable, key=lambda w: w.submit, default=None)
        # Allowed: a version not finished before the newest durable write started.
        acceptable = [
            w
            for w in versions
            if newest is None or w.complete is None or w.complete > newest.submit
        ]
        required = initial if newest is None else _content(newest, s)
        match = next((w for w in acceptable if _content(w, s) == found), None)
        if match is not None:
            durable_match = sched.reference_durable(match, keep)
            counts["must" if durable_match or found == required else "may"] += 1
        elif newest is None and found == initial:
            counts["must"] += 1
        elif found == initial or any(_content(w, s) == found for w in versions):
            counts["lost"] += 1
        else:
            counts["corrupt"] += 1
    counts["sectors"] = len(touched)
    return counts


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=schedules(),
    keep=st.sampled_from(PROMISES),
    seed=st.integers(0, 2**16),
    faithful=st.booleans(),
)
def test_the_oracle_agrees_with_the_contract_on_any_image_of_a_concurrent_log(
    steps: list[tuple[str, int, int, bool]], keep: Promise, seed: int, faithful: bool
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="powercut-oracle-") as tmp:
        sched = Schedule.new(Path(tmp), seed=seed)
        play(sched, steps, seed)
        sched.finish()
        writes = sched.writes()
        image = bytearray(sched.base)
        # Each written sector holds some version: an allowed one (faithful), or any of
        # the initial content, every write's, and garbage.
        for s in sorted({s for w in writes for s in w.sectors}):
            versions = [w for w in writes if s in w.sectors]
            choices = [sched.base[s * S : (s + 1) * S]] + [_content(w, s) for w in versions]
            if faithful:
                durable = [w for w in versions if sched.reference_durable(w, keep)]
                newest = max(durable, key=lambda w: w.submit, default=None)
                choices = [
                    _content(w, s)
                    for w in versions
                    if newest is None or w.complete is None or w.complete > newest.submit
                ] + ([sched.base[s * S : (s + 1) * S]] if newest is None else [])
            elif rng.random() < 0.1:
                choices = [rng.randbytes(S)]
            image[s * S : (s + 1) * S] = rng.choice(choices)
        path = Path(tmp) / "d.img"
        path.write_bytes(image)
        report = check(path, sched.log, keep)
        want = reference(sched, bytes(image), keep)
        got = {
            "must": report.must,
            "may": report.may,
            "lost": report.lost,
            "corrupt": report.corrupt,
            "sectors": report.sectors_checked,
        }
        assert got == {k: want[k] for k in got}, report.violations
        assert report.ok is (want["lost"] == want["corrupt"] == 0)
        if faithful:
            assert report.ok
        assert report.unknown == 0  # the log knows every sector's initial content
        assert report.writes == len(writes)
        assert report.writes_completed == sum(1 for w in writes if w.ok)
        assert report.writes_durable == sum(1 for w in writes if sched.reference_durable(w, keep))
        assert report.fua_writes == sum(1 for w in writes if w.ok and w.fua)
        flushes = [r for r in sched.reqs if r.op is Op.FLUSH]
        assert report.flushes_completed == sum(1 for f in flushes if f.ok)
        bad = sorted(v.sector for v in report.violations)
        assert len(bad) == min(20, want["lost"] + want["corrupt"])


@pytest.mark.parametrize("keep", PROMISES)
def test_violations_name_the_write_the_contract_required(tmp_path: Path, keep: Promise) -> None:
    sched = Schedule.new(tmp_path / "log")
    fua = sched.write(0, b"f" * S, fua=True)
    w = sched.write(2 * S, b"w" * S)
    sched.complete(w)
    sched.complete(fua)
    sched.complete(sched.flush())
    sched.finish()
    report = check(_image(sched, tmp_path / "d.img", {}), sched.log, keep)  # both lost
    owed = {Promise.FLUSHED: [fua, w], Promise.EVERY_COMPLETED: [fua, w], Promise.NOTHING: []}
    assert [v.expected_seq for v in report.violations] == owed[keep]
    assert all(v.kind == "lost" and v.found_seq == 0 for v in report.violations)


# -- sectors more than one write touched (the oracle's per-sector classification) ----------


def test_an_overwritten_sector_holding_its_newest_unflushed_write_counts_as_unflushed(
    tmp_path: Path,
) -> None:
    sched = Schedule.new(tmp_path / "log")
    for fill in (b"a", b"b"):
        sched.complete(sched.write(0, fill * S))
    sched.finish()
    report = check(_image(sched, tmp_path / "i.img", {0: b"b" * S}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (0, 1, 1)


def test_a_write_a_flush_in_flight_at_the_cut_may_have_covered_is_not_unflushed(
    tmp_path: Path,
) -> None:
    # The disk may finish a flush the guest never heard of before the power goes: a
    # lose-all that keeps what it covered did its duty (seen under load on btrfs).
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, b"a" * S))
    sched.flush()  # submitted, never completed: the cut came first
    sched.finish()
    report = check(_image(sched, tmp_path / "i.img", {0: b"a" * S}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.may, report.unflushed) == (1, 0)
    # Without the flush in flight the same sector is unflushed: the model had to revert it.
    alone = Schedule.new(tmp_path / "log2")
    alone.complete(alone.write(0, b"a" * S))
    alone.finish()
    report = check(_image(alone, tmp_path / "j.img", {0: b"a" * S}), alone.log, CacheMode.WRITEBACK)
    assert report.ok and (report.may, report.unflushed) == (1, 1)


def test_an_unflushed_write_of_what_was_there_already_leaves_the_sector_as_it_must_be(
    tmp_path: Path,
) -> None:
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, sched.base[:S]))  # the sector's own content
    sched.complete(sched.write(0, b"b" * S))
    sched.finish()
    report = check(_image(sched, tmp_path / "i.img", {}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (1, 0, 0)


def test_the_newest_durable_write_is_the_last_submitted_even_when_an_older_one_ends_later(
    tmp_path: Path,
) -> None:
    sched = Schedule.new(tmp_path / "log")
    first = sched.write(0, b"0" * S)
    middle = sched.write(0, b"v" * S)
    sched.complete(middle)
    last = sched.write(0, b"2" * S)  # submitted after `middle` completed
    sched.complete(first)  # completes after `last` was submitted
    sched.complete(last)
    sched.complete(sched.flush())
    sched.finish()
    # `middle` finished before `last` (durable) started: its content is lost data.
    report = check(_image(sched, tmp_path / "v.img", {0: b"v" * S}), sched.log, CacheMode.WRITEBACK)
    assert (report.lost, report.ok) == (1, False)
    for kept in (b"0", b"2"):  # `first` and `last` overlap: either may be on the disk
        report = check(
            _image(sched, tmp_path / "k.img", {0: kept * S}), sched.log, CacheMode.WRITEBACK
        )
        assert report.ok and report.must == 1


def test_the_sectors_an_unflushed_write_left_as_they_were_must_hold_so(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path / "log")
    data = b"x" * S + sched.base[3 * S : 4 * S]  # its second sector holds what was there
    sched.complete(sched.write(2 * S, data))
    sched.finish()
    image = _image(sched, tmp_path / "i.img", {2: data[:S], 3: data[S:]})
    report = check(image, sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (1, 1, 1)


def test_a_write_completed_while_the_last_flush_ran_is_not_unflushed(tmp_path: Path) -> None:
    # The flush may have reached the disk after that write did: no layer must have lost it.
    sched, _before, _inflight = _flush_while_in_flight(tmp_path / "log")
    image = _image(sched, tmp_path / "i.img", {0: b"b" * S, 4: b"i" * S})
    report = check(image, sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (1, 1, 0)


def test_an_empty_write_is_not_counted_as_a_write(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, b"a" * S))
    sched.complete(sched.write(4 * S, b""))  # a guest may send one: it writes no sector
    sched.finish()
    report = check(_image(sched, tmp_path / "i.img", {0: b"a" * S}), sched.log, CacheMode.WRITEBACK)
    assert (report.writes, report.writes_completed, report.sectors_checked) == (1, 1, 1)


def test_only_the_first_twenty_violations_by_sector_are_listed(tmp_path: Path) -> None:
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, b"f" * (24 * S), fua=True))
    sched.finish()
    report = check(_image(sched, tmp_path / "i.img", {}), sched.log, CacheMode.WRITEBACK)
    assert report.lost == 24
    assert [v.sector for v in report.violations] == list(range(20))


# -- discards: their content is unspecified (zeroes, or anything written before them) -------


def _discard_in_flight(tmp: Path, *, write_first: bool) -> tuple[Schedule, int, int]:
    """Sector 0: a write and a discard in flight together (the write submitted first or
    second), the write completes, then a FUA write is submitted and completes; the discard
    is still in flight at the cut."""
    sched = Schedule.new(tmp)
    if write_first:
        w = sched.write(0, b"w" * S)
        sched.discard(0, S)
    else:
        sched.discard(0, S)
        w = sched.write(0, b"w" * S)
    sched.complete(w)
    durable = sched.write(0, b"n" * S, fua=True)  # submitted after `w` completed
    sched.complete(durable)
    sched.finish()
    return sched, w, durable


def test_a_write_submitted_before_a_discard_may_still_be_there(tmp_path: Path) -> None:
    sched, w, durable = _discard_in_flight(tmp_path / "log", write_first=True)
    assert w == 1  # the seq the initial content is not
    # The discard may have left the sector as it was: the write it was submitted after.
    report = check(_image(sched, tmp_path / "w.img", {0: b"w" * S}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (0, 1, 1)
    # Or as it was before anything: the initial content is no write, so not unflushed.
    report = check(_image(sched, tmp_path / "b.img", {}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (0, 1, 0)
    assert durable == 3


def test_a_write_submitted_after_a_discard_is_lost_once_a_durable_write_followed(
    tmp_path: Path,
) -> None:
    sched, w, durable = _discard_in_flight(tmp_path / "log", write_first=False)
    # `w` came after the discard and finished before the durable write started: old data.
    report = check(_image(sched, tmp_path / "w.img", {0: b"w" * S}), sched.log, CacheMode.WRITEBACK)
    assert (report.ok, report.lost, report.may) == (False, 1, 0)
    assert [(v.sector, v.kind, v.expected_seq, v.found_seq) for v in report.violations] == [
        (0, "lost", durable, w)
    ]
