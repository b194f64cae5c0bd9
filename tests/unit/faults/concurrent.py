"""Write logs with concurrent I/O, written record by record, and the contract they are judged by.

The block stack runs one request at a time in a test, so every log it leaves is
strictly sequential: each write completes before the next request is submitted.
A guest's queue is not like that. `Schedule` writes a log the way `log-writes`
would under concurrent I/O, with the order of events chosen by the test: a
write submitted, a flush submitted while it is in flight, completions out of
submission order, writes still in flight at the end. It keeps every request's
data, so the test knows what each version of a sector holds without reading
the log back.

`covered` and `reference_durable` are the contract's definition written out
once more, independently of `harness.durability` and `harness.explore`: a
write is durable when it completed successfully and the promise keeps every
completed write, or it was FUA, or some flush that completed successfully was
*submitted after the write completed*. Tests compare the product code with
these, never with values the product code computed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from harness.durability.contract import CacheMode, Promise
from harness.durability.writelog import (
    LogFlags,
    LogHeader,
    LogRecordType,
    LogWriter,
    Op,
    ReqFlags,
    crc_bytes,
    read_log,
    sector_crcs,
)
from harness.explore.recording import BASE_NAME, Recording, acks_from_marks, write_recording

S = 512  # the log's sector size


@dataclass
class Req:
    """One request of a schedule, as the test knows it (not as any reader parsed it)."""

    seq: int
    op: Op
    offset: int
    length: int
    fua: bool
    submit: int  # record index of its SUBMIT
    data: bytes = b""  # what a write writes (zeroes for write-zeroes)
    complete: int | None = None  # record index of its COMPLETE
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def sectors(self) -> range:
        """The sectors it covers whole."""
        return range(-(-self.offset // S), (self.offset + self.length) // S)

    @property
    def partial(self) -> set[int]:
        """The sectors it covers only in part (an unaligned request's ends)."""
        if not self.length:
            return set()
        ends = {self.offset // S, (self.offset + self.length - 1) // S}
        return ends - set(self.sectors)

    def sector_data(self, sector: int) -> bytes:
        at = sector * S - self.offset
        return self.data[at : at + S]


@dataclass
class Schedule:
    """A write log (and a recording's base) built one record at a time."""

    root: Path
    base: bytes
    reqs: list[Req] = field(default_factory=list)
    marks: list[tuple[int, str]] = field(default_factory=list)
    records: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "write.log"
        self.writer = LogWriter(self.log, LogHeader(S, LogFlags.DATA | LogFlags.PREIMAGE, 0))
        self._seen: set[int] = set()
        self._append(LogRecordType.OPEN, Op.NONE, 0, 0, 0, 0)

    @classmethod
    def new(cls, root: Path, sectors: int = 32, seed: int = 0) -> Schedule:
        return cls(root, random.Random(f"base/{seed}").randbytes(sectors * S))

    def _append(
        self,
        rtype: LogRecordType,
        op: Op,
        flags: int,
        seq: int,
        offset: int,
        length: int,
        payload: list[bytes] | None = None,
    ) -> int:
        self.writer.append(rtype, op, flags, seq, offset, length, payload, time_ns=self.records)
        self.records += 1
        return self.records - 1

    def _new_sectors(self, first: int, count: int) -> bool:
        fresh = any(s not in self._seen for s in range(first, first + count))
        self._seen.update(range(first, first + count))
        return fresh

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> int:
        """Submit a write; returns its seq. Guests' writes are sector-aligned; a test may
        submit others to see what refuses them (the reference below assumes aligned), or an
        empty one (a guest may send it: it writes no sector)."""
        seq = len(self.reqs) + 1
        first, count = -(-offset // S), max(0, (offset + len(data)) // S - -(-offset // S))
        flags = int(ReqFlags.HAS_DATA) | (int(ReqFlags.FUA) if fua else 0)
        payload = [crc_bytes(sector_crcs(data, offset, S))]
        if self._new_sectors(first, count):
            # The first write to these sectors carries what they held before: the base.
            pre = self.base[first * S : (first + count) * S]
            payload.append(crc_bytes(sector_crcs(pre, 0, S)))
            flags |= int(ReqFlags.HAS_PRE)
        payload.append(data)
        at = self._append(LogRecordType.SUBMIT, Op.WRITE, flags, seq, offset, len(data), payload)
        self.reqs.append(Req(seq, Op.WRITE, offset, len(data), fua, at, data))
        return seq

    def _preimage(self, offset: int, length: int) -> None:
        """A zeroes' or discard's pre-image record: the base of the whole sectors it covers
        that nothing wrote before (as log-writes records it, before the request)."""
        first, end = -(-offset // S), (offset + length) // S
        if end > first and self._new_sectors(first, end - first):
            pre = crc_bytes(sector_crcs(self.base[first * S : end * S], 0, S))
            self._append(LogRecordType.PREIMAGE, Op.NONE, 0, 0, first * S, (end - first) * S, [pre])

    def zeroes(self, offset: int, length: int, *, fua: bool = False) -> int:
        assert length
        seq = len(self.reqs) + 1
        self._preimage(offset, length)
        flags = int(ReqFlags.FUA) if fua else 0
        at = self._append(LogRecordType.SUBMIT, Op.WRITE_ZEROES, flags, seq, offset, length)
        self.reqs.append(Req(seq, Op.WRITE_ZEROES, offset, length, fua, at, bytes(length)))
        return seq

    def discard(self, offset: int, length: int) -> int:
        """Submit a discard (its content afterwards is unspecified: zeroes or the old data)."""
        assert length
        seq = len(self.reqs) + 1
        self._preimage(offset, length)
        at = self._append(LogRecordType.SUBMIT, Op.DISCARD, 0, seq, offset, length)
        self.reqs.append(Req(seq, Op.DISCARD, offset, length, False, at, bytes(length)))
        return seq

    def flush(self) -> int:
        seq = len(self.reqs) + 1
        at = self._append(LogRecordType.SUBMIT, Op.FLUSH, 0, seq, 0, 0)
        self.reqs.append(Req(seq, Op.FLUSH, 0, 0, False, at))
        return seq

    def complete(self, seq: int, status: int = 0) -> int:
        req = self.reqs[seq - 1]
        assert req.complete is None, f"request {seq} completed twice"
        req.complete = self._append(LogRecordType.COMPLETE, Op.NONE, 0, seq, 0, status)
        req.status = status
        return req.complete

    def ack(self, token: str) -> int:
        """The workload acknowledged `token` now (a log mark, as the recorder places it)."""
        at = self._append(LogRecordType.MARK, Op.NONE, 0, 0, 0, 0, [f"ack {token}".encode()])
        self.marks.append((at, token))
        return at + 1

    def in_flight(self) -> list[int]:
        return [r.seq for r in self.reqs if r.complete is None]

    def finish(self) -> Recording:
        """Close the log (nothing more completes) and describe it as a recording."""
        self.writer.close()
        (self.root / BASE_NAME).write_bytes(self.base)
        acks = acks_from_marks(read_log(self.log))
        return write_recording(self.root, mode=CacheMode.WRITEBACK, acks=acks)

    # -- the contract, written out for the test ------------------------------------------

    def writes(self) -> list[Req]:
        return [r for r in self.reqs if r.op is not Op.FLUSH]

    def covered(self, w: Req, at: int) -> bool:
        """Some successful flush completed before `at` and was submitted after `w` completed."""
        assert w.complete is not None
        return any(
            f.op is Op.FLUSH
            and f.ok
            and f.complete is not None
            and f.complete < at
            and f.submit > w.complete
            for f in self.reqs
        )

    def reference_durable(self, w: Req, keep: Promise, at: int | None = None) -> bool:
        """Whether a cut at record `at` (the end: None) must keep `w` under `keep`."""
        at = self.records if at is None else at
        if keep is Promise.NOTHING or not w.ok or w.complete is None or w.complete >= at:
            return False
        return keep is Promise.EVERY_COMPLETED or w.fua or self.covered(w, at)

    def reference_pending(self, keep: Promise, at: int) -> list[int]:
        """Seqs a cut at `at` may lose, in completion order (then in flight, by submission)."""
        pending = [
            w for w in self.writes() if w.submit < at and not self.reference_durable(w, keep, at)
        ]
        done = sorted(
            (w for w in pending if w.complete is not None and w.complete < at),
            key=lambda w: w.complete or 0,
        )
        rest = sorted((w for w in pending if w not in done), key=lambda w: w.submit)
        return [w.seq for w in done + rest]

    def reference_points(self, ack_indexes: Iterable[int] = ()) -> list[int]:
        """Record indexes of the persistence points: before each completion of a flush or a
        FUA write, each acknowledgement, and the end."""
        at = {
            r.complete
            for r in self.reqs
            if r.ok and r.complete is not None and (r.op is Op.FLUSH or r.fua)
        }
        return sorted(at | set(ack_indexes) | {self.records})

    def reference_image(self, kept: dict[int, set[int] | None], at: int) -> bytes:
        """The base, then in each sector the latest-submitted write the state keeps there.

        `kept`: seq -> None (the whole write) or the sectors of it that are kept.
        """
        image = bytearray(self.base)
        for s in range(len(self.base) // S):
            best: Req | None = None
            for w in self.writes():
                if w.submit >= at or s not in w.sectors or w.seq not in kept:
                    continue
                sectors = kept[w.seq]
                if sectors is not None and s not in sectors:
                    continue
                if best is None or w.submit > best.submit:
                    best = w
            if best is not None:
                image[s * S : (s + 1) * S] = best.sector_data(s)
        return bytes(image)


# -- random schedules -------------------------------------------------------------------


@st.composite
def schedules(
    draw: st.DrawFn,
    *,
    sectors: int = 24,
    max_requests: int = 12,
    zeroes: bool = True,
    discards: bool = False,
    unaligned: bool = False,
) -> list[tuple[str, int, int, bool]]:
    """Steps of a concurrent schedule: ("write"|"zeroes"|"discard", sector, count, fua),
    ("flush",...), ("complete", k, status, _) completing the k-th oldest request in flight,
    ("ack", ...).

    Requests overlap in time and in sectors; some fail; some are still in flight at the end.
    `unaligned`: some requests start or end inside a sector, by a byte or by a part of it
    ("write-bytes"|"zeroes-bytes"|"discard-bytes", byte offset, byte length, fua); some
    cover no whole sector at all.
    """
    steps: list[tuple[str, int, int, bool]] = []
    in_flight = 0
    submitted = 0
    kinds = ["write", "write", "flush", "complete", "complete", "complete", "ack"]
    if zeroes:
        kinds.append("zeroes")
    if discards:
        kinds.append("discard")
    for _ in range(draw(st.integers(1, 4 * max_requests))):
        kind = draw(st.sampled_from(kinds))
        if kind == "complete":
            if not in_flight:
                continue
            k = draw(st.integers(0, in_flight - 1))
            status = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 5]))
            steps.append(("complete", k, status, False))
            in_flight -= 1
            continue
        if kind == "ack":
            steps.append(("ack", 0, 0, False))
            continue
        if submitted >= max_requests:
            continue
        submitted += 1
        in_flight += 1
        if kind == "flush":
            steps.append(("flush", 0, 0, False))
        else:
            first = draw(st.integers(0, sectors - 1))
            count = draw(st.integers(1, min(6, sectors - first)))
            fua = draw(st.booleans()) and kind != "discard"
            if unaligned and draw(st.booleans()):
                # Ends moved into a sector: by one byte, a part, or all but one byte.
                offset = first * S + draw(st.sampled_from([0, 1, S // 4, S // 2, S - 1]))
                end = (first + count) * S - draw(st.sampled_from([0, 1, S // 2, S - 1]))
                steps.append((kind + "-bytes", offset, max(1, end - offset), fua))
            else:
                steps.append((kind, first, count, fua))
    # Most requests complete eventually; a few stay in flight at the cut.
    while in_flight and draw(st.integers(0, 3)):
        steps.append(("complete", draw(st.integers(0, in_flight - 1)), 0, False))
        in_flight -= 1
    return steps


def play(sched: Schedule, steps: list[tuple[str, int, int, bool]], seed: int = 0) -> None:
    """Write `steps` into `sched`; write data is distinct per write and per sector."""
    rng = random.Random(seed)
    acks = 0
    for kind, a, b, fua in steps:
        if kind.endswith("-bytes"):  # offset and length in bytes
            kind = kind.removesuffix("-bytes")
        elif kind in ("write", "zeroes", "discard"):  # in sectors
            a, b = a * S, b * S
        if kind == "write":
            sched.write(a, rng.randbytes(b), fua=fua)
        elif kind == "zeroes":
            sched.zeroes(a, b, fua=fua)
        elif kind == "discard":
            sched.discard(a, b)
        elif kind == "flush":
            sched.flush()
        elif kind == "complete":
            sched.complete(sched.in_flight()[a], b)
        else:
            acks += 1
            sched.ack(str(acks))
