"""A crash state on disk: the sectors where it differs from a base image.

Exploration (`harness.explore`) describes each crash state as the base image
plus the sectors that differ; the `crash-state` block driver presents such a
state to a checker guest, and `powercut explore replay` rebuilds an image from
one. This module is the one format both read, so the block layer need not
know about exploration.

Format, version 1, little-endian:

    header  DELTA_HEADER (40 bytes)
        magic        8s   b"PCDELTA\\0"
        version      u16  1
        header_size  u16  40
        sector_size  u32  bytes per sector (512 or more, a power of two)
        image_size   u64  length of the base image it applies to
        runs         u64  number of runs
        crc32        u32  of the runs table (the 36 bytes before it are not covered)
        reserved     u32  0

    runs table  `runs` x DELTA_RUN (12 bytes), sorted by sector, not overlapping
        sector       u64  first sector of the run
        count        u32  sectors in the run

    data  the runs' sectors, back to back, in table order
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.errors import JournalError

DELTA_HEADER = struct.Struct("<8sHHIQQII")
DELTA_RUN = struct.Struct("<QI")
DELTA_MAGIC = b"PCDELTA\x00"
DELTA_VERSION = 1


@dataclass(frozen=True)
class Delta:
    """A delta read into memory: sorted runs (first sector, sector count, data)."""

    sector_size: int
    image_size: int
    runs: tuple[tuple[int, int, bytes], ...]

    @property
    def sectors(self) -> int:
        return sum(count for _first, count, _data in self.runs)

    def iter_sectors(self) -> Iterator[tuple[int, bytes]]:
        ss = self.sector_size
        for first, count, data in self.runs:
            for i in range(count):
                yield first + i, data[i * ss : (i + 1) * ss]

    def patch(self, offset: int, buf: memoryview) -> None:
        """Overwrite the bytes of `buf` (device bytes from `offset`) that this delta changes."""
        _patch(self.runs, self._starts(), self.sector_size, offset, buf)

    def _starts(self) -> list[int]:
        starts = self.__dict__.get("_starts_cache")
        if starts is None:
            starts = [first for first, _count, _data in self.runs]
            object.__setattr__(self, "_starts_cache", starts)
        return starts


def _patch(
    runs: tuple[tuple[int, int, bytes], ...],
    starts: list[int],
    ss: int,
    offset: int,
    buf: memoryview,
) -> None:
    end = offset + len(buf)
    i = max(0, bisect.bisect_right(starts, offset // ss) - 1)
    while i < len(runs):
        first, count, data = runs[i]
        lo, hi = first * ss, (first + count) * ss
        if lo >= end:
            break
        a, b = max(lo, offset), min(hi, end)
        if a < b:
            buf[a - offset : b - offset] = data[a - lo : b - lo]
        i += 1


def runs_of(sectors: Iterable[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Contiguous runs of sorted (sector, data) pairs."""
    out: list[tuple[int, int, list[bytes]]] = []
    for s, data in sectors:
        if out and out[-1][0] + out[-1][1] == s:
            first, count, parts = out[-1]
            parts.append(data)
            out[-1] = (first, count + 1, parts)
        else:
            out.append((s, 1, [data]))
    return [(first, count, b"".join(parts)) for first, count, parts in out]


def write_delta(
    path: Path | str, sector_size: int, image_size: int, sectors: Iterable[tuple[int, bytes]]
) -> int:
    """Store sorted (sector, data) pairs as a delta file; returns the number of sectors."""
    runs = runs_of(sectors)
    table = b"".join(DELTA_RUN.pack(first, count) for first, count, _data in runs)
    header = DELTA_HEADER.pack(
        DELTA_MAGIC,
        DELTA_VERSION,
        DELTA_HEADER.size,
        sector_size,
        image_size,
        len(runs),
        zlib.crc32(table),
        0,
    )
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(table)
        for _first, _count, data in runs:
            f.write(data)
    os.replace(tmp, path)
    return sum(count for _first, count, _data in runs)


def read_delta(path: Path | str) -> Delta:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise JournalError(f"state delta {path} does not exist") from None
    if len(raw) < DELTA_HEADER.size:
        raise JournalError(f"{path} is too short to be a powercut state delta")
    magic, version, hsize, ss, image_size, nruns, crc, _r = DELTA_HEADER.unpack_from(raw)
    if magic != DELTA_MAGIC or hsize != DELTA_HEADER.size:
        raise JournalError(f"{path} is not a powercut state delta (magic {magic!r})")
    if version != DELTA_VERSION:
        raise JournalError(f"state delta {path} has version {version}; this powercut reads 1")
    table_end = DELTA_HEADER.size + nruns * DELTA_RUN.size
    table = raw[DELTA_HEADER.size : table_end]
    if len(table) != nruns * DELTA_RUN.size or zlib.crc32(table) != crc:
        raise JournalError(f"state delta {path}: runs table damaged (checksum mismatch)")
    runs = []
    pos = table_end
    last_end = -1
    for k in range(nruns):
        first, count = DELTA_RUN.unpack_from(table, k * DELTA_RUN.size)
        if first < last_end or (first + count) * ss > image_size:
            raise JournalError(f"state delta {path}: run {k} is out of order or beyond the image")
        data = raw[pos : pos + count * ss]
        if len(data) != count * ss:
            raise JournalError(f"state delta {path}: data of run {k} is truncated")
        runs.append((first, count, data))
        pos += count * ss
        last_end = first + count
    return Delta(ss, image_size, tuple(runs))
