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
import zlib
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

INF = float("inf")


def _content(req: Req, sector: int) -> bytes:
    """What `req` leaves in a sector it covers whole (zeroes and discards: zeroes)."""
    return bytes(S) if req.op is not Op.WRITE else req.sector_data(sector)


def _settled(sched: Schedule) -> float:
    """The record after which a completed write is `unflushed`: the completion of the last
    successful flush; with a flush in flight at the cut (which may have finished below), the
    end, so that only writes in flight themselves count."""
    flushes = [r for r in sched.reqs if r.op is Op.FLUSH]
    if any(f.complete is None for f in flushes):
        return sched.records
    return max((f.complete for f in flushes if f.ok and f.complete is not None), default=-1)


def _touched(writes: list[Req]) -> list[int]:
    """Every sector some request covers, whole or in part."""
    return sorted({s for w in writes for s in (*w.sectors, *w.partial)})


def _versions(sched: Schedule, keep: Promise, s: int) -> tuple[list[Req], Req | None, list[Req]]:
    """A sector's versions (the requests covering it, in submission order), the newest
    durable one, and those the contract allows: the ones not finished before it started."""
    versions = [w for w in sched.writes() if s in w.sectors or s in w.partial]
    durable = [w for w in versions if sched.reference_durable(w, keep)]
    newest = max(durable, key=lambda w: w.submit, default=None)
    allowed = [
        w for w in versions if newest is None or w.complete is None or w.complete > newest.submit
    ]
    return versions, newest, allowed


def _held(w: Req, s: int, base: bytes) -> bytes:
    """What `w` leaves in sector `s`, whose content was `base`: its version of a sector it
    covers whole; of one it covers in part, its bytes over the base there."""
    if s in w.sectors:
        return _content(w, s)
    mixed = bytearray(base)
    lo, hi = max(w.offset, s * S), min(w.offset + w.length, (s + 1) * S)
    fill = w.data[lo - w.offset : hi - w.offset] if w.op is Op.WRITE else bytes(hi - lo)
    mixed[lo - s * S : hi - s * S] = fill
    return bytes(mixed)


def reference(
    sched: Schedule, image: bytes, keep: Promise
) -> tuple[Counter[str], list[tuple[int, str, int | None, int | None]]]:
    """Each sector any request covered, whole or in part, classified by the contract's
    definition; and every violation (sector, kind, the newest durable write, the write
    found: 0 the initial content, None nothing known), by sector."""
    counts: Counter[str] = Counter()
    violations: list[tuple[int, str, int | None, int | None]] = []
    writes = sched.writes()
    settled = _settled(sched)
    touched = _touched(writes)
    for s in touched:
        found = image[s * S : (s + 1) * S]
        # The log records a sector's initial content with the first request covering it whole.
        initial = sched.base[s * S : (s + 1) * S] if any(s in w.sectors for w in writes) else None
        versions, newest, acceptable = _versions(sched, keep, s)
        expected = newest.seq if newest is not None else None
        whole = [w for w in acceptable if s in w.sectors]
        kind: str
        seen: int | None = None
        if len(whole) < len(acceptable):
            kind = "may"  # a request covering it in part may have left anything
        elif newest is None and initial is None:
            kind = "unknown"
        else:
            required = initial if newest is None else _content(newest, s)
            match = next((w for w in whole if _content(w, s) == found), None)
            discards = [w for w in whole if w.op is Op.DISCARD]
            latest = max((d.submit for d in discards), default=None)
            older = next(
                (
                    w
                    for w in versions
                    if latest is not None
                    and w.submit < latest
                    and s in w.sectors
                    and _content(w, s) == found
                ),
                None,
            )
            if match is not None:
                durable_match = sched.reference_durable(match, keep)
                kind = "must" if durable_match or found == required else "may"
                seen = match.seq
            elif newest is None and found == initial:
                kind, seen = "must", 0
            elif discards and found in (bytes(S), initial):
                kind, seen = "may", 0  # a discard's content: zeroes, or what was there
            elif older is not None:
                kind, seen = "may", older.seq  # or a version from before the discard
            else:
                kind = "corrupt"
                for w in reversed(versions):
                    if s in w.sectors and _content(w, s) == found:
                        kind, seen = "lost", w.seq
                        break
                else:
                    if found == initial:
                        kind, seen = "lost", 0
        counts[kind] += 1
        if kind == "may" and seen:
            holder = next(w for w in versions if w.seq == seen)
            if (INF if holder.complete is None else holder.complete) > settled:
                counts["unflushed"] += 1
        if kind in ("lost", "corrupt"):
            violations.append((s, kind, expected, seen))
    counts["sectors"] = len(touched)
    return counts, violations


def _an_image(sched: Schedule, keep: Promise, rng: random.Random, kind: str) -> bytearray:
    """Each sector a request covered holds some version: an allowed one ("faithful"), or
    any of the initial content, every request's, zeroes and garbage ("any"); or ("writes")
    the base with a random choice of whole requests applied in submission order, as a cut
    that keeps or drops each write would leave it."""
    writes = sched.writes()
    if kind == "writes":
        kept = [w for w in writes if rng.random() < 0.6]
        return bytearray(sched.reference_image(dict.fromkeys(w.seq for w in kept), sched.records))
    faithful = kind == "faithful"
    image = bytearray(sched.base)
    for s in _touched(writes):
        base = sched.base[s * S : (s + 1) * S]
        versions, newest, allowed = _versions(sched, keep, s)
        if faithful:
            choices = [_held(w, s, base) for w in allowed] + ([base] if newest is None else [])
            if any(w.op is Op.DISCARD and s in w.sectors for w in allowed):
                choices.append(bytes(S))
        else:
            choices = [base, bytes(S)] + [_held(w, s, base) for w in versions]
            if rng.random() < 0.1:
                choices = [rng.randbytes(S)]
        image[s * S : (s + 1) * S] = rng.choice(choices)
    return image


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=st.one_of(schedules(), schedules(discards=True, unaligned=True)),
    keep=st.sampled_from(PROMISES),
    seed=st.integers(0, 2**16),
    image_kind=st.sampled_from(["faithful", "any", "writes"]),
    listed=st.sampled_from([20, 20, 3, 1, 0]),
)
def test_the_oracle_agrees_with_the_contract_on_any_image_of_a_concurrent_log(
    steps: list[tuple[str, int, int, bool]],
    keep: Promise,
    seed: int,
    image_kind: str,
    listed: int,
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="powercut-oracle-") as tmp:
        sched = Schedule.new(Path(tmp), seed=seed)
        play(sched, steps, seed)
        sched.finish()
        writes = sched.writes()
        path = Path(tmp) / "d.img"
        image = _an_image(sched, keep, rng, image_kind)
        path.write_bytes(image)
        report = check(path, sched.log, keep, max_violations=listed)
        want, violations = reference(sched, bytes(image), keep)
        got = {
            "must": report.must,
            "may": report.may,
            "unknown": report.unknown,
            "lost": report.lost,
            "corrupt": report.corrupt,
            "sectors": report.sectors_checked,
            "unflushed": report.unflushed,
        }
        assert got == {k: want[k] for k in got}, report.violations
        assert report.ok is (want["lost"] == want["corrupt"] == 0)
        if image_kind == "faithful":
            assert report.ok
        assert report.unknown == 0  # the log knows every sector's initial content
        assert [
            (v.sector, v.kind, v.expected_seq, v.found_seq) for v in report.violations
        ] == violations[:listed]
        assert report.writes == len([w for w in writes if w.length])
        assert report.writes_completed == sum(1 for w in writes if w.ok and w.length)
        assert report.writes_durable == sum(1 for w in writes if sched.reference_durable(w, keep))
        assert report.fua_writes == sum(1 for w in writes if w.ok and w.fua)
        flushes = [r for r in sched.reqs if r.op is Op.FLUSH]
        assert report.flushes_completed == sum(1 for f in flushes if f.ok)
        # What the report says it judged: this image, this log, this promise.
        assert (report.image, report.log, report.sector_size) == (str(path), str(sched.log), S)
        assert (report.mode, report.contract) == (keep.mode_name, keep.value)
        assert report.requests == len(sched.reqs)


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


@pytest.mark.parametrize("held", ["whole", "in part", "overwritten"])
def test_a_write_completed_while_a_flush_is_in_flight_at_the_cut_is_not_unflushed(
    tmp_path: Path, held: str
) -> None:
    # The disk may have run that flush after the write reached it: even the last
    # completion before the cut may have been flushed below. The sector holding it is
    # judged whole, one sector of its span at a time, or among several versions.
    sched = Schedule.new(tmp_path / "log")
    if held == "overwritten":
        sched.complete(sched.write(0, b"a" * (2 * S)))
    sched.flush()  # never completes
    last = sched.write(0, b"b" * (2 * S))
    sched.complete(last)  # the last record: its completion is the newest index there is
    sched.finish()
    second = b"b" * S if held != "in part" else sched.base[S : 2 * S]
    image = _image(sched, tmp_path / "i.img", {0: b"b" * S, 1: second})
    report = check(image, sched.log, CacheMode.WRITEBACK)
    assert report.ok, report.violations
    assert (report.may, report.unflushed) == (2 if held != "in part" else 1, 0)


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
    # Also when the write's other sector is not there (each sector judged on its own).
    report = check(_image(sched, tmp_path / "j.img", {}), sched.log, CacheMode.WRITEBACK)
    assert report.ok and (report.must, report.may, report.unflushed) == (2, 0, 0)


def test_a_write_inside_one_sector_leaves_the_sectors_judged_before_it_as_they_were(
    tmp_path: Path,
) -> None:
    # A request that covers no sector whole (a guest on a disk with larger log sectors):
    # it has nothing to compare, and the counts of the requests before it stand.
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, b"d" * (2 * S), fua=True))
    sched.complete(sched.write(4 * S + 100, b"p" * 200))
    sched.complete(sched.zeroes(6 * S + 1, S - 2))
    sched.complete(sched.write(8 * S, b"q" * S))
    sched.finish()
    image = _image(sched, tmp_path / "i.img", {0: b"d" * S, 1: b"d" * S, 8: b"q" * S})
    report = check(image, sched.log, CacheMode.WRITEBACK)
    assert report.ok and report.sectors_checked == 5
    # Sectors 0 and 1 as the FUA write left them; 4 and 6 may hold anything; 8 is unflushed.
    assert (report.must, report.may, report.unflushed) == (2, 3, 1)


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


# -- the image as the oracle reads it -------------------------------------------------------


def _truncated(sched: Schedule, path: Path, size: int) -> Path:
    """The faithful image of `_short_disk`'s log, cut to its first `size` bytes."""
    image = bytearray(sched.base)
    image[0 : 4 * S] = b"d" * (4 * S)
    image[6 * S : 8 * S] = bytes(2 * S)
    path.write_bytes(bytes(image[:size]))
    return path


def test_an_image_shorter_than_the_log_reads_as_zeroes_beyond_its_end(tmp_path: Path) -> None:
    # A disk the guest wrote past the end of the image file's size (a sparse or truncated
    # file): beyond the end the host reads zeroes, and so does the oracle.
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(0, b"d" * (4 * S), fua=True))
    sched.complete(sched.zeroes(6 * S, 2 * S, fua=True))
    sched.finish()
    for size, must, corrupt in (
        (8 * S, 6, 0),  # whole: every sector as written
        (2 * S + 200, 4, 2),  # sector 2 ends in zeroes, 3 is zeroes; 6 and 7 read as zeroes
        (4 * S, 6, 0),  # the write ends with the file: only the zeroes lie beyond
        (S, 3, 3),
        (0, 2, 4),  # an empty file: all zeroes
    ):
        report = check(_truncated(sched, tmp_path / "t.img", size), sched.log, Promise.FLUSHED)
        assert (report.must, report.corrupt, report.lost) == (must, corrupt, 0), size
        assert [v.sector for v in report.violations] == list(range(4 - corrupt, 4)), size


def _with_crc(prefix: bytes, target: int) -> bytes:
    """`prefix` and four more bytes whose CRC-32 is `target` (CRC-32 is affine over GF(2) in
    its input's bits, so the four bytes solve a 32 x 32 linear system)."""
    base = zlib.crc32(prefix + bytes(4))
    columns = [zlib.crc32(prefix + (1 << i).to_bytes(4, "little")) ^ base for i in range(32)]
    # Gaussian elimination: rows are (column value, the input bits that make it).
    rows = [(c, 1 << i) for i, c in enumerate(columns)]
    solved: list[tuple[int, int]] = []
    for bit in range(32):
        pivot = next(r for r in rows if r[0] >> bit & 1)
        rows.remove(pivot)
        rows = [(c ^ pivot[0], x ^ pivot[1]) if c >> bit & 1 else (c, x) for c, x in rows]
        solved = [(c ^ pivot[0], x ^ pivot[1]) if c >> bit & 1 else (c, x) for c, x in solved]
        solved.append(pivot)
    want, bits = base ^ target, 0
    for c, x in solved:  # each solved row now has one bit of the column space
        if want & c:
            bits ^= x
    data = prefix + bits.to_bytes(4, "little")
    assert zlib.crc32(data) == target
    return data


def test_a_sector_covered_in_part_matches_no_content_even_one_whose_crc_is_small(
    tmp_path: Path,
) -> None:
    # The oracle marks a sector a request covers only in part with a CRC no content has;
    # a sector that happens to hold content with a small CRC must not pass for it.
    sched = Schedule.new(tmp_path / "log")
    sched.complete(sched.write(2 * S + 100, b"p" * 100, fua=True))
    sched.finish()
    for crc in (0, 1, 2, 0xFFFFFFFF):
        image = _image(sched, tmp_path / "i.img", {2: _with_crc(bytes(S - 4), crc)})
        report = check(image, sched.log, CacheMode.WRITEBACK)
        assert report.ok and (report.must, report.may) == (0, 1), crc
