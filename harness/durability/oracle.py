"""The durability oracle: is what the image holds after a power cut inside the contract?

From the write log (what the guest was told, `harness.durability.writelog`) and a
promise (`harness.durability.contract`), every sector written during the log gets:

* the writes the contract makes durable (`must`): under writeback/none every
  write that completed before the start of a flush that completed, and every
  FUA write; under writethrough/directsync every completed write; under
  unsafe nothing;
* the content that *may* be there: the newest durable write, or any write that
  was not finished before the newest durable write started (a later completed
  or still in-flight write; concurrent ones in either order); the initial
  content only when no write to the sector is durable; after a discard, also
  zeroes and anything before it;
* everything else is a violation: `lost` when it is an older version (the
  initial content or a write the durable one overwrote), `corrupt` when it
  matches no version at all.

Contents are compared by CRC-32 per sector, so it answers for any data —
also fio's, or a filesystem's — without the data in the log.
"""

from __future__ import annotations

import enum
import heapq
import mmap
import os
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from harness.durability.contract import CacheMode, Promise, host_cut_promise
from harness.durability.writelog import Op, Request, WriteLog, read_log

INFINITY = 1 << 62
_NONE: frozenset[int] = frozenset()


class SectorState(enum.Enum):
    """What a sector holds, judged against the contract."""

    MUST = "must"  # the content the contract requires
    MAY = "may"  # a later completed or in-flight write, or allowed by a discard
    UNKNOWN = "unknown"  # no durable write and the initial content was not recorded
    LOST = "lost"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class Violation:
    sector: int
    kind: str  # "lost" or "corrupt"
    expected_seq: int | None  # the newest durable write to the sector (None: the initial content)
    found_seq: int | None  # the write whose content is there (0: the initial content; None: none)


@dataclass(frozen=True)
class OracleReport:
    image: str
    log: str
    mode: str
    contract: str
    sector_size: int
    requests: int
    writes: int
    writes_durable: int
    flushes_completed: int
    sectors_checked: int
    must: int
    may: int
    unknown: int
    lost: int
    corrupt: int
    violations: list[Violation] = field(default_factory=list)  # the first ones, by sector
    # Of the `may` sectors, those holding a write that completed after the last completed
    # flush had completed: no flush can have covered it at any layer. (A write completing
    # while that flush ran may have reached the disk before it, so it is not counted; with
    # a flush in flight at the cut, which may have finished below, none is counted.)
    unflushed: int = 0
    # Of `writes` (every logged write, in flight at the cut or not), those that completed:
    # the ones the guest was told about.
    writes_completed: int = 0
    fua_writes: int = 0  # completed writes the guest sent with FUA

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.corrupt == 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        verdict = "inside the contract" if self.ok else "VIOLATES the contract"
        return (
            f"{self.mode} ({self.contract}): {verdict}; {self.sectors_checked} sectors: "
            f"{self.must} must, {self.may} may, {self.unknown} unknown, {self.lost} lost, "
            f"{self.corrupt} corrupt; {self.writes_durable} of {self.writes} writes durable"
        )


# Version kinds in a sector's history.
_WRITE, _ZEROES, _DISCARD, _ANY = 0, 1, 2, 3
# (submit index, completion index, durable, seq, kind)
Meta = tuple[int, int, bool, int, int]
# (crc, meta)
Version = tuple[int, Meta]


def _durable_flags(requests: Iterable[Request], promise: Promise) -> dict[int, bool]:
    reqs = list(requests)
    last_flush = max(
        (r.submit_index for r in reqs if r.op == Op.FLUSH and r.completed_ok), default=-1
    )
    return {
        r.seq: promise.durable(
            completed=r.completed_ok and r.complete_index is not None,
            fua=r.fua,
            before_last_flush=r.complete_index is not None and r.complete_index < last_flush,
        )
        for r in reqs
    }


def _promise(contract: Promise | CacheMode) -> tuple[Promise, str]:
    """The promise to check and the name reports give it (a cache mode's, or the promise's)."""
    if isinstance(contract, Promise):
        return contract, contract.mode_name
    return host_cut_promise(contract), contract.value


def check(
    image: Path | str,
    wlog: WriteLog | Path | str,
    contract: Promise | CacheMode,
    *,
    max_violations: int = 20,
) -> OracleReport:
    """Classify every sector the log wrote; see the module docstring.

    `contract` is the promise to check (`harness.durability.contract`), or a
    cache mode, which stands for its promise across a host power cut.
    """
    image = Path(image)
    if not isinstance(wlog, WriteLog):
        wlog = read_log(wlog)
    contract, mode = _promise(contract)
    ss = wlog.header.sector_size
    zero_crc = zlib.crc32(bytes(ss))
    durable = _durable_flags(wlog.requests, contract)
    settle = max(
        (
            r.complete_index
            for r in wlog.requests
            if r.op == Op.FLUSH and r.completed_ok and r.complete_index is not None
        ),
        default=-1,
    )
    if any(r.op == Op.FLUSH and r.complete_index is None for r in wlog.requests):
        # A flush still in flight at the cut may have finished below before the power
        # went (the disk made durable what it covered; the guest never heard): any write
        # completed before the cut may be on the disk, so none is counted as unflushed.
        settle = max(
            (max(r.submit_index, r.complete_index or 0) for r in wlog.requests), default=-1
        )

    # Every write, zeroes or discard becomes a span: (first sector, sector CRCs, meta,
    # CRC of the whole span or None), meta = (submit index, completion index, durable,
    # seq, kind). `owner` maps each sector to the span that wrote it (C-level dict
    # updates); sectors written more than once also list all their spans in `multi`.
    spans: list[tuple[int, list[int], Meta, int | None]] = []
    owner: dict[int, int] = {}
    multi: dict[int, list[int]] = {}
    pre_events: list[tuple[int, int, Any]] = list(wlog.preimages)
    zero_spans: dict[int, int] = {}
    writes = completed = 0
    flush_op, write_op, zeroes_op = Op.FLUSH, Op.WRITE, Op.WRITE_ZEROES
    for r in wlog.requests:
        op = r.op
        if op is flush_op or r.length == 0:
            continue
        writes += 1
        completed += r.completed_ok  # an in-flight write has no status yet
        done = r.complete_index if r.complete_index is not None else INFINITY
        offset, length = r.offset, r.length
        first = -(-offset // ss)
        count = max(0, (offset + length) // ss - first)
        dur = durable[r.seq]
        if op is write_op:
            meta = (r.submit_index, done, dur, r.seq, _WRITE)
            crcs: list[int] = r.crcs.tolist() if r.crcs is not None else []
            span_crc = r.span_crc
            if r.pre is not None:
                pre_events.append((r.submit_index, first, r.pre))
        else:
            meta = (r.submit_index, done, dur, r.seq, _ZEROES if op is zeroes_op else _DISCARD)
            crcs = [zero_crc] * count
            if count not in zero_spans:
                zero_spans[count] = zlib.crc32(bytes(count * ss))
            span_crc = zero_spans[count]
        index = len(spans)
        spans.append((first, crcs, meta, span_crc))
        span = range(first, first + len(crcs))
        for s in owner.keys() & span:
            multi.setdefault(s, [owner[s]]).append(index)
        owner.update(zip(span, repeat(index)))
        if offset % ss or length % ss:
            # Sectors the request covers only in part: their content cannot be predicted.
            partial = (r.submit_index, done, dur, r.seq, _ANY)
            for s in {offset // ss, (offset + length - 1) // ss} - set(span):
                index = len(spans)
                spans.append((s, [-1], partial, None))  # -1 matches no CRC
                if s in owner:
                    multi.setdefault(s, [owner[s]]).append(index)
                owner[s] = index
    initial: dict[int, int] = {}
    pre_events.sort(key=lambda e: e[0], reverse=True)  # the earliest record wins
    for _index, first, pre in pre_events:
        initial.update(zip(range(first, first + len(pre)), pre, strict=False))

    counts = dict.fromkeys(SectorState, 0)
    # The lowest-numbered violations: a bounded max-heap keyed by -sector.
    worst: list[tuple[int, Violation]] = []

    def history(s: int, indexes: list[int]) -> list[Version]:
        out = []
        for i in indexes:
            first, crcs, meta, _span_crc = spans[i]
            out.append((crcs[s - first], meta))
        return out

    def classify(s: int, versions: list[Version], c: int) -> None:
        verdict, expected, seen = _classify(versions, initial.get(s), c)
        counts[verdict] += 1
        if verdict is SectorState.MAY and seen:  # the write it holds (its seq)
            done = next(meta[1] for _crc, meta in versions if meta[3] == seen)
            if done > settle:
                late[0] += 1
        if verdict in (SectorState.LOST, SectorState.CORRUPT) and max_violations > 0:
            item = (-s, Violation(s, verdict.value, expected, seen))
            if len(worst) < max_violations:
                heapq.heappush(worst, item)
            elif -s > worst[0][0]:
                heapq.heapreplace(worst, item)

    multi_keys = multi.keys()
    must = may = 0
    late = [0]  # `unflushed` sectors (see OracleReport)
    with _Image(image, ss) as img:
        # Sectors with one version, a span at a time: one CRC over the whole span when it
        # can be compared at once, else one per sector.
        for index, (first, crcs, meta, span_crc) in enumerate(spans):
            count = len(crcs)
            shared = multi_keys & range(first, first + count) if multi else _NONE
            dur = meta[2]
            if not shared:
                if not count:
                    continue  # a request inside one sector: its partial span judges it
                held = span_crc is not None and img.span_crc(first, count) == span_crc
                if not held:
                    found = img.crcs(first, count)
                    held = found == crcs
                if held:  # the whole span holds this write
                    if dur:
                        must += count
                    else:
                        unchanged = _unchanged(first, crcs, initial)
                        must += unchanged
                        may += count - unchanged
                        if meta[1] > settle:
                            late[0] += count - unchanged
                    continue
            else:
                found = img.crcs(first, count)
            for i, c in enumerate(found):
                s = first + i
                if s in shared or owner[s] != index:
                    continue
                if c == crcs[i] and meta[4] != _ANY:
                    # A rewrite with the old content: it is also what must be there.
                    if dur or initial.get(s) == c:
                        must += 1
                    else:
                        may += 1
                        if meta[1] > settle:
                            late[0] += 1
                else:
                    classify(s, [(crcs[i], meta)], c)
        # Sectors written more than once, read in contiguous runs.
        keys = sorted(multi)
        i = 0
        while i < len(keys):
            j = i + 1
            while j < len(keys) and keys[j] == keys[j - 1] + 1 and j - i < 8192:
                j += 1
            for s, c in zip(keys[i:j], img.crcs(keys[i], j - i), strict=True):
                classify(s, history(s, multi[s]), c)
            i = j
    counts[SectorState.MUST] += must
    counts[SectorState.MAY] += may
    violations = sorted((v for _key, v in worst), key=lambda v: v.sector)

    return OracleReport(
        image=str(image),
        log=str(wlog.path),
        mode=mode,
        contract=contract.value,
        sector_size=ss,
        requests=len(wlog.requests),
        writes=writes,
        writes_durable=sum(1 for r in wlog.requests if r.op != Op.FLUSH and durable[r.seq]),
        flushes_completed=sum(1 for r in wlog.requests if r.op == Op.FLUSH and r.completed_ok),
        sectors_checked=len(owner),
        must=counts[SectorState.MUST],
        may=counts[SectorState.MAY],
        unknown=counts[SectorState.UNKNOWN],
        lost=counts[SectorState.LOST],
        corrupt=counts[SectorState.CORRUPT],
        violations=violations,
        unflushed=late[0],
        writes_completed=completed,
        fua_writes=sum(1 for r in wlog.requests if r.op != Op.FLUSH and r.fua and r.completed_ok),
    )


def _unchanged(first: int, crcs: list[int], initial: dict[int, int]) -> int:
    """Sectors of a not yet durable write that hold what was there before it."""
    return sum(1 for i, c in enumerate(crcs) if initial.get(first + i) == c)


def _classify(
    versions: list[Version], initial: int | None, found: int
) -> tuple[SectorState, int | None, int | None]:
    newest: tuple[int, int, bool, int, int] | None = None
    for _crc, meta in versions:
        if meta[2] and (newest is None or meta[0] > newest[0]):
            newest = meta
    horizon = newest[0] if newest is not None else -1
    expected = newest[3] if newest is not None else None
    # A version is acceptable unless it finished before the newest durable write started.
    acceptable = [(crc, meta) for crc, meta in versions if meta[1] > horizon]
    if any(meta[4] == _ANY for _crc, meta in acceptable):
        return SectorState.MAY, expected, None
    # The content the contract requires: the newest durable write's, else the initial.
    required = next((crc for crc, meta in versions if meta is newest), initial)
    for crc, meta in acceptable:
        if crc == found:
            must = meta[2] or found == required  # a later write that changed nothing here
            return (SectorState.MUST if must else SectorState.MAY), expected, meta[3]
    if newest is None:
        if initial is None:
            return SectorState.UNKNOWN, None, None
        if initial == found:
            return SectorState.MUST, None, 0
    # A discard's content is unspecified: zeroes (its own version, matched above) or
    # whatever was there before it.
    discards = [meta[0] for _crc, meta in acceptable if meta[4] == _DISCARD]
    if discards:
        latest = max(discards)
        if found == initial:
            return SectorState.MAY, expected, 0
        for crc, meta in versions:
            if meta[0] < latest and crc == found:
                return SectorState.MAY, expected, meta[3]
    for crc, meta in reversed(versions):
        if crc == found and meta[4] != _ANY:
            return SectorState.LOST, expected, meta[3]
    if initial is not None and initial == found:
        return SectorState.LOST, expected, 0
    return SectorState.CORRUPT, expected, None


class _Image:
    """CRC-32s of image sectors, from a read-only mapping; beyond the end reads as zeroes."""

    def __init__(self, path: Path, sector_size: int) -> None:
        self.path = path
        self.ss = sector_size
        self.size = 0
        self._mm: mmap.mmap | None = None
        self._view = memoryview(b"")

    def __enter__(self) -> _Image:
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._view = memoryview(self._mm)
        return self

    def __exit__(self, *exc: object) -> None:
        self._view.release()
        if self._mm is not None:
            self._mm.close()

    def _bytes(self, first: int, count: int) -> memoryview:
        start = first * self.ss
        end = start + count * self.ss
        if end <= self.size:
            return self._view[start:end]
        head = bytes(self._view[start : self.size]) if start < self.size else b""
        return memoryview(head.ljust(end - start, b"\0"))

    def span_crc(self, first: int, count: int) -> int:
        return zlib.crc32(self._bytes(first, count))

    def crcs(self, first: int, count: int) -> list[int]:
        ss = self.ss
        mv = self._bytes(first, count)
        crc32 = zlib.crc32
        return [crc32(mv[k : k + ss]) for k in range(0, count * ss, ss)]
