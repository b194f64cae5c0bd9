"""The durability oracle: is what the image holds after a power cut inside the contract?

From the write log (what the guest was told, `harness.crash.writelog`) and a
cache mode's contract (design.md), every sector written during the log gets:

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
import os
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from harness.crash.writelog import Op, Request, WriteLog, read_log, whole_sectors
from harness.errors import ConfigError

INFINITY = 1 << 62


class Contract(enum.Enum):
    """What must survive a host power cut (design.md, "The durability contract")."""

    EVERY_COMPLETED = "every completed write"
    FLUSHED_OR_FUA = "every write completed before a completed flush started, and every FUA write"
    NOTHING = "nothing"


_MODES = {
    "writethrough": Contract.EVERY_COMPLETED,
    "directsync": Contract.EVERY_COMPLETED,
    "writeback": Contract.FLUSHED_OR_FUA,
    "none": Contract.FLUSHED_OR_FUA,
    "off": Contract.FLUSHED_OR_FUA,
    "unsafe": Contract.NOTHING,
}
MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")


def contract_for(mode: str) -> Contract:
    try:
        return _MODES[mode]
    except KeyError:
        raise ConfigError(f"unknown cache mode {mode!r}; valid modes: {', '.join(MODES)}") from None


class Verdict(enum.Enum):
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
# (crc, (submit index, completion index, durable, seq, kind))
Version = tuple[int, tuple[int, int, bool, int, int]]


def _durable_flags(requests: Iterable[Request], contract: Contract) -> dict[int, bool]:
    reqs = list(requests)
    if contract is Contract.NOTHING:
        return {r.seq: False for r in reqs}
    if contract is Contract.EVERY_COMPLETED:
        return {r.seq: r.completed_ok for r in reqs}
    last_flush = max(
        (r.submit_index for r in reqs if r.op == Op.FLUSH and r.completed_ok), default=-1
    )
    return {
        r.seq: r.completed_ok
        and r.complete_index is not None
        and (r.fua or r.complete_index < last_flush)
        for r in reqs
    }


def check(
    image: Path | str, wlog: WriteLog | Path | str, mode: str, *, max_violations: int = 20
) -> OracleReport:
    """Classify every sector the log wrote; see the module docstring."""
    image = Path(image)
    if not isinstance(wlog, WriteLog):
        wlog = read_log(wlog)
    contract = contract_for(mode)
    ss = wlog.header.sector_size
    zero_crc = zlib.crc32(bytes(ss))
    durable = _durable_flags(wlog.requests, contract)

    # Per sector, its versions in submit order: (crc, meta), meta = (submit index,
    # completion index, durable, seq, kind). Almost every sector has one version, kept in
    # `single` (filled by C-level dict updates); sectors with more also have all in `multi`.
    single: dict[int, Version] = {}
    multi: dict[int, list[Version]] = {}
    initial: dict[int, int] = {}
    pre_events: list[tuple[int, int, Any]] = list(wlog.preimages)
    spans: list[tuple[int, int, list[int], bool]] = []  # (first, count, crcs, durable)
    writes = 0
    for r in wlog.requests:
        if r.op == Op.FLUSH or r.length == 0:
            continue
        writes += 1
        done = r.complete_index if r.complete_index is not None else INFINITY
        first, count = whole_sectors(r.offset, r.length, ss)
        dur = durable[r.seq]
        if r.op == Op.WRITE:
            meta = (r.submit_index, done, dur, r.seq, _WRITE)
            crcs: list[int] = r.crcs.tolist() if r.crcs is not None else []
            if r.pre is not None:
                pre_events.append((r.submit_index, first, r.pre))
        else:
            kind = _ZEROES if r.op == Op.WRITE_ZEROES else _DISCARD
            meta = (r.submit_index, done, dur, r.seq, kind)
            crcs = [zero_crc] * count
        span = range(first, first + len(crcs))
        versions = list(zip(crcs, repeat(meta), strict=False))
        for s in single.keys() & span:
            multi.setdefault(s, [single[s]]).append(versions[s - first])
        single.update(zip(span, versions, strict=False))
        spans.append((first, len(crcs), crcs, dur))
        if r.offset % ss or r.length % ss:
            # Sectors the request covers only in part: their content cannot be predicted.
            partial = (r.submit_index, done, dur, r.seq, _ANY)
            for s in {r.offset // ss, (r.offset + r.length - 1) // ss} - set(span):
                if s in single:
                    multi.setdefault(s, [single[s]]).append((0, partial))
                single[s] = (0, partial)
                spans.append((s, 1, [-1], dur))  # never matches: classified one by one
    pre_events.sort(key=lambda e: e[0], reverse=True)  # the earliest record wins
    for _index, first, pre in pre_events:
        initial.update(zip(range(first, first + len(pre)), pre, strict=False))

    counts = dict.fromkeys(Verdict, 0)
    violations: list[Violation] = []

    def classify(s: int, history: list[Version], c: int) -> None:
        verdict, expected, seen = _classify(history, initial.get(s), c, zero_crc)
        counts[verdict] += 1
        if verdict in (Verdict.LOST, Verdict.CORRUPT) and len(violations) < max_violations:
            violations.append(Violation(s, verdict.value, expected, seen))

    multi_keys = multi.keys()
    with _Image(image, ss) as img:
        # Sectors with one version, a request at a time: one read, one list comparison.
        for first, count, crcs, dur in spans:
            found = img.crcs(first, count)
            span = range(first, first + count)
            shared = multi_keys & span
            if not shared and found == crcs:
                counts[Verdict.MUST if dur else Verdict.MAY] += count
                continue
            verdict = Verdict.MUST if dur else Verdict.MAY
            for i, c in enumerate(found):
                s = first + i
                if s in shared:
                    continue
                if c == crcs[i]:
                    counts[verdict] += 1
                else:
                    classify(s, [single[s]], c)
        # Sectors written more than once, read in contiguous runs.
        keys = sorted(multi)
        i = 0
        while i < len(keys):
            j = i + 1
            while j < len(keys) and keys[j] == keys[j - 1] + 1 and j - i < 8192:
                j += 1
            for s, c in zip(keys[i:j], img.crcs(keys[i], j - i), strict=True):
                classify(s, multi[s], c)
            i = j
    violations.sort(key=lambda v: v.sector)

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
        sectors_checked=len(single),
        must=counts[Verdict.MUST],
        may=counts[Verdict.MAY],
        unknown=counts[Verdict.UNKNOWN],
        lost=counts[Verdict.LOST],
        corrupt=counts[Verdict.CORRUPT],
        violations=violations,
    )


def _classify(
    versions: list[Version], initial: int | None, found: int, zero_crc: int
) -> tuple[Verdict, int | None, int | None]:
    newest: tuple[int, int, bool, int, int] | None = None
    for _crc, meta in versions:
        if meta[2] and (newest is None or meta[0] > newest[0]):
            newest = meta
    horizon = newest[0] if newest is not None else -1
    expected = newest[3] if newest is not None else None
    # A version is acceptable unless it finished before the newest durable write started.
    acceptable = [(crc, meta) for crc, meta in versions if meta[1] > horizon]
    if any(meta[4] == _ANY for _crc, meta in acceptable):
        return Verdict.MAY, expected, None
    for crc, meta in acceptable:
        if crc == found:
            return (Verdict.MUST if meta[2] else Verdict.MAY), expected, meta[3]
    if newest is None:
        if initial is None:
            return Verdict.UNKNOWN, None, None
        if initial == found:
            return Verdict.MUST, None, 0
    # A discard's content is unspecified: zeroes or whatever was there before it.
    discards = [meta[0] for _crc, meta in acceptable if meta[4] == _DISCARD]
    if discards:
        latest = max(discards)
        if found in (zero_crc, initial):
            return Verdict.MAY, expected, 0
        for crc, meta in versions:
            if meta[0] < latest and crc == found:
                return Verdict.MAY, expected, meta[3]
    for crc, meta in reversed(versions):
        if crc == found and meta[4] != _ANY:
            return Verdict.LOST, expected, meta[3]
    if initial is not None and initial == found:
        return Verdict.LOST, expected, 0
    return Verdict.CORRUPT, expected, None


class _Image:
    """Reads CRC-32s of image sectors; what lies beyond the end reads as zeroes."""

    def __init__(self, path: Path, sector_size: int) -> None:
        self.path = path
        self.ss = sector_size
        self.fd = -1

    def __enter__(self) -> _Image:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def crcs(self, first: int, count: int) -> list[int]:
        ss = self.ss
        size = count * ss
        data = os.pread(self.fd, size, first * ss)
        if len(data) < size:
            data = data.ljust(size, b"\0")
        mv = memoryview(data)
        crc32 = zlib.crc32
        return [crc32(mv[k : k + ss]) for k in range(0, size, ss)]
