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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
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

    # Per sector: the versions written to it, in submit order.
    # Each: (crc, submit_index, complete_index, durable, seq, kind)
    history: dict[int, list[tuple[int, int, int, bool, int, int]]] = defaultdict(list)
    initial: dict[int, int] = {}
    pre_events: list[tuple[int, int, Any]] = [(i, f, c) for i, f, c in wlog.preimages]
    writes = 0
    for r in wlog.requests:
        if r.op == Op.FLUSH or r.length == 0:
            continue
        writes += 1
        done = r.complete_index if r.complete_index is not None else INFINITY
        dur = durable[r.seq]
        first, count = whole_sectors(r.offset, r.length, ss)
        if r.op == Op.WRITE:
            crcs = r.crcs if r.crcs is not None else ()
            for i, c in enumerate(crcs):
                history[first + i].append((c, r.submit_index, done, dur, r.seq, _WRITE))
            if r.pre is not None:
                pre_events.append((r.submit_index, first, r.pre))
        else:
            kind = _ZEROES if r.op == Op.WRITE_ZEROES else _DISCARD
            for s in range(first, first + count):
                history[s].append((zero_crc, r.submit_index, done, dur, r.seq, kind))
        # Sectors the request covers only in part: their content cannot be predicted.
        start_sector = r.offset // ss
        end_sector = -(-(r.offset + r.length) // ss)
        for s in {start_sector, end_sector - 1}:
            if not first <= s < first + count:
                history[s].append((0, r.submit_index, done, dur, r.seq, _ANY))
    pre_events.sort(key=lambda e: e[0])
    for _index, first, crcs in pre_events:
        for i, c in enumerate(crcs):
            initial.setdefault(first + i, c)

    counts = dict.fromkeys(Verdict, 0)
    violations: list[Violation] = []
    sectors = sorted(history)
    found = _image_crcs(image, sectors, ss)
    for s, c in zip(sectors, found, strict=True):
        verdict, expected, seen = _classify(history[s], initial.get(s), c, zero_crc)
        counts[verdict] += 1
        if verdict in (Verdict.LOST, Verdict.CORRUPT) and len(violations) < max_violations:
            violations.append(Violation(s, verdict.value, expected, seen))

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
        sectors_checked=len(sectors),
        must=counts[Verdict.MUST],
        may=counts[Verdict.MAY],
        unknown=counts[Verdict.UNKNOWN],
        lost=counts[Verdict.LOST],
        corrupt=counts[Verdict.CORRUPT],
        violations=violations,
    )


def _classify(
    versions: list[tuple[int, int, int, bool, int, int]],
    initial: int | None,
    found: int,
    zero_crc: int,
) -> tuple[Verdict, int | None, int | None]:
    newest_durable = None
    for v in versions:
        if v[3] and (newest_durable is None or v[1] > newest_durable[1]):
            newest_durable = v
    horizon = newest_durable[1] if newest_durable is not None else -1
    expected = newest_durable[4] if newest_durable is not None else None
    # A version is acceptable unless it finished before the newest durable write started.
    acceptable = [v for v in versions if v[2] > horizon]
    if any(v[5] == _ANY for v in acceptable):
        return Verdict.MAY, expected, None
    for v in acceptable:
        if v[0] == found:
            return (Verdict.MUST if v[3] else Verdict.MAY), expected, v[4]
    if newest_durable is None:
        if initial is None:
            return Verdict.UNKNOWN, None, None
        if initial == found:
            return Verdict.MUST, None, 0
    # A discard's content is unspecified: zeroes or whatever was there before it.
    discards = [v[1] for v in acceptable if v[5] == _DISCARD]
    if discards:
        latest = max(discards)
        if found in (zero_crc, initial):
            return Verdict.MAY, expected, 0
        for v in versions:
            if v[1] < latest and v[0] == found:
                return Verdict.MAY, expected, v[4]
    for v in reversed(versions):
        if v[0] == found and v[5] != _ANY:
            return Verdict.LOST, expected, v[4]
    if initial is not None and initial == found:
        return Verdict.LOST, expected, 0
    return Verdict.CORRUPT, expected, None


def _image_crcs(image: Path, sectors: list[int], ss: int) -> list[int]:
    """CRC-32 of each listed sector (sorted) of the image, read in contiguous runs."""
    out: list[int] = []
    crc32 = zlib.crc32
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        i = 0
        n = len(sectors)
        max_run = (4 << 20) // ss
        while i < n:
            j = i + 1
            while j < n and sectors[j] == sectors[j - 1] + 1 and j - i < max_run:
                j += 1
            start = sectors[i] * ss
            data = os.pread(fd, (j - i) * ss, start)
            if len(data) < (j - i) * ss:
                data = data.ljust((j - i) * ss, b"\0") if start < size else bytes((j - i) * ss)
            mv = memoryview(data)
            out.extend(crc32(mv[k : k + ss]) for k in range(0, (j - i) * ss, ss))
            i = j
    finally:
        os.close(fd)
    return out
