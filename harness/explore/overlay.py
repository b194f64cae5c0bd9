"""A crash state as the base image plus the sectors that differ — never a copy of the disk.

Every sector a write of the log touches has a *version* per write: where its
data is in the log (or zeroes), a 64-bit digest of that data, and its share of
the state's content hash (zero when it equals the base image's sector, so a
state that rewrote a sector with what was there hashes like one that did not).
The versions are computed once per recording (`SectorTable`).

A state's content at a point is the base image, then the durable writes, then
the pending writes it keeps (whole, or the sectors of a torn one it keeps),
each sector holding the version of the latest-submitted write that reaches it.
The durable part is one map per point, advanced from point to point as writes
become durable (`DurableMap`); a state adds only its kept pending writes on top
(`StateView`). The content hash is a sum of per-sector shares, updated the
same way, so a state costs what its pending writes cost, not what the run wrote.

`Scratch` is one reusable image file: it holds one state at a time, and moving
it to the next state rewrites only the sectors whose versions differ between
the two. `replay` writes a state as a standalone image (a sparse copy of the
base plus its sectors) for a person to mount or fsck; `write_state_delta`
stores it in the `harness.durability.delta` format the `crash-state` block
driver serves.

Writes must be aligned to the log's sector size (every guest's are); a
partial-sector write is refused with a clear error rather than guessed at.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from harness.durability.contract import Promise
from harness.durability.delta import write_delta
from harness.durability.writelog import Op
from harness.errors import ConfigError, JournalError
from harness.explore.recording import Recording, sparse_copy
from harness.explore.states import Point, State, Timeline

MASK = (1 << 128) - 1
ZERO_POS = -1

# One version of one sector: (submit index of its write, seq, data position in the log or
# ZERO_POS, digest, hash share). Tuples: millions of them are compared in the hot loops.
Version = tuple[int, int, int, int, int]


def _digest(data: bytes | memoryview) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _share(sector: int, digest: int) -> int:
    h = hashlib.blake2b(sector.to_bytes(8, "little") + digest.to_bytes(8, "little"), digest_size=16)
    return int.from_bytes(h.digest(), "little")


class _Mapped:
    """A read-only mapping of a file (empty files map to nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.mm: mmap.mmap | None = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
            )

    def read(self, pos: int, n: int) -> bytes:
        if self.mm is None or pos >= self.size:
            return bytes(n)
        data = self.mm[pos : pos + n]
        return data if len(data) == n else data.ljust(n, b"\0")

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None


class SectorTable:
    """Every sector version of the log's writes, against the base image."""

    def __init__(self, timeline: Timeline, log_path: Path | str, base: Path | str) -> None:
        self.timeline = timeline
        self.ss = ss = timeline.sector_size
        self.log = _Mapped(Path(log_path))
        self.base = _Mapped(Path(base))
        self.image_size = self.base.size
        self.zero_sector = bytes(ss)
        zero_digest = _digest(self.zero_sector)
        self._base_digest: dict[int, int] = {}
        self.versions: dict[int, tuple[int, list[Version]]] = {}  # seq -> (first sector, versions)
        for w in timeline.writes:
            if w.offset % ss or w.length % ss:
                raise ConfigError(
                    f"write {w.seq} ({w.offset}+{w.length}) is not aligned to the log's "
                    f"{ss}-byte sectors; exploration rebuilds whole sectors only"
                )
            if w.offset + w.length > self.image_size:
                raise ConfigError(
                    f"write {w.seq} ends at byte {w.offset + w.length}, beyond the base image "
                    f"({self.image_size} bytes); is it the recording's base?"
                )
            first, count = w.offset // ss, w.length // ss
            out: list[Version] = []
            if w.op == Op.WRITE:
                if w.data_offset is None:
                    raise JournalError(
                        f"write log {log_path} has no data for write {w.seq}; record with "
                        "log-data=on"
                    )
                mm = self.log.mm
                assert mm is not None
                for i in range(count):
                    s = first + i
                    pos = w.data_offset + i * ss
                    d = _digest(mm[pos : pos + ss])
                    out.append((w.submit_index, w.seq, pos, d, self._share(s, d)))
            else:
                # Write-zeroes, and discard as the file driver does it (a punched hole).
                for i in range(count):
                    s = first + i
                    out.append(
                        (w.submit_index, w.seq, ZERO_POS, zero_digest, self._share(s, zero_digest))
                    )
            self.versions[w.seq] = (first, out)

    def base_digest(self, sector: int) -> int:
        d = self._base_digest.get(sector)
        if d is None:
            d = self._base_digest[sector] = _digest(self.base_sector(sector))
        return d

    def _share(self, sector: int, digest: int) -> int:
        return 0 if digest == self.base_digest(sector) else _share(sector, digest)

    def base_sector(self, sector: int) -> bytes:
        return self.base.read(sector * self.ss, self.ss)

    def data(self, version: Version) -> bytes:
        pos = version[2]
        if pos == ZERO_POS:
            return self.zero_sector
        return self.log.read(pos, self.ss)

    def close(self) -> None:
        self.log.close()
        self.base.close()


class DurableMap:
    """The durable writes' versions per sector at one point, advanced point by point."""

    def __init__(self, table: SectorTable) -> None:
        self.table = table
        self._order = sorted(
            (w for w in table.timeline.writes if w.durable_at < (1 << 62)),
            key=lambda w: (w.durable_at, w.submit_index),
        )
        self._reset()

    def _reset(self) -> None:
        self.map: dict[int, Version] = {}
        self.hash = 0
        self.at = -1
        self._next = 0
        self.changed: set[int] | None = None  # sectors changed since `take_changed`; None: all

    def advance(self, point: Point) -> None:
        if point.at < self.at:
            self._reset()
        versions = self.table.versions
        m = self.map
        h = self.hash
        changed = self.changed
        order = self._order
        i = self._next
        while i < len(order) and order[i].durable_at <= point.at:
            first, vs = versions[order[i].seq]
            for k, v in enumerate(vs):
                s = first + k
                cur = m.get(s)
                if cur is None or cur[0] < v[0]:
                    if cur is not None:
                        h -= cur[4]
                    h += v[4]
                    m[s] = v
                    if changed is not None:
                        changed.add(s)
            i += 1
        self._next = i
        self.hash = h & MASK
        self.at = point.at

    def take_changed(self) -> set[int] | None:
        """Sectors whose durable version changed since the last call (None: start over)."""
        changed = self.changed
        self.changed = set()
        return changed


class StateView:
    """One state's content: the durable map at its point plus its kept pending versions.

    A view borrows the builder's durable map: use it before building the next one.
    """

    def __init__(self, table: SectorTable, durable: DurableMap, state: State) -> None:
        self.table = table
        self.state = state
        self.durable = durable.map
        over: dict[int, Version] = {}
        versions = table.versions
        lost = set(state.lost)
        torn = {seq: set(s) for seq, s in state.torn}
        dmap = self.durable
        for w in table.timeline.pending(state.point):
            if w.seq in lost:
                continue
            first, vs = versions[w.seq]
            gone = torn.get(w.seq)
            for k, v in enumerate(vs):
                s = first + k
                if gone is not None and s in gone:
                    continue
                cur = over.get(s) or dmap.get(s)
                if cur is None or cur[0] < v[0]:
                    over[s] = v
        self.over = over
        h = durable.hash
        for s, v in over.items():
            d = dmap.get(s)
            if d is not None:
                h -= d[4]
            h += v[4]
        self.hash = h & MASK

    @property
    def digest(self) -> str:
        return f"{self.hash:032x}"

    def version(self, sector: int) -> Version | None:
        v = self.over.get(sector)
        return v if v is not None else self.durable.get(sector)

    def differing(self) -> Iterator[tuple[int, Version]]:
        """Sorted (sector, version) of every sector whose content differs from the base."""
        for s in sorted(self.durable.keys() | self.over.keys()):
            v = self.version(s)
            if v is not None and v[4] != 0:
                yield s, v

    def read(self, offset: int, length: int) -> bytes:
        ss = self.table.ss
        out = bytearray(self.table.base.read(offset, length))
        first = offset // ss
        last = -(-(offset + length) // ss)
        for s in range(first, last):
            v = self.version(s)
            if v is None:
                continue
            data = self.table.data(v)
            lo = s * ss
            a, b = max(lo, offset), min(lo + ss, offset + length)
            out[a - offset : b - offset] = data[a - lo : b - lo]
        return bytes(out)


class StateBuilder:
    """Builds views of a recording's states; keeps one durable map, advanced as points go by."""

    def __init__(self, timeline: Timeline, log_path: Path | str, base: Path | str) -> None:
        self.timeline = timeline
        self.table = SectorTable(timeline, log_path, base)
        self.durable = DurableMap(self.table)

    def view(self, state: State) -> StateView:
        self.durable.advance(state.point)
        return StateView(self.table, self.durable, state)

    def replay(self, state: State, out: Path | str) -> Path:
        """Write `state` as a standalone image file (sparse base copy plus its sectors)."""
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        sparse_copy(self.table.base.path, tmp)
        view = self.view(state)
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _write_runs(fd, self.table, view.differing())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
        return out

    def delta(self, state: State, path: Path | str) -> int:
        """Store `state` as a delta file (`harness.durability.delta`); returns its sector count."""
        view = self.view(state)
        return write_delta(
            path,
            self.table.ss,
            self.table.image_size,
            ((s, self.table.data(v)) for s, v in view.differing()),
        )

    def close(self) -> None:
        self.table.close()

    def __enter__(self) -> StateBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay_state(recording: Recording, keep: Promise, state: State, out: Path | str) -> Path:
    """`powercut explore replay`: rebuild one recorded state (explore.json's) as an image.

    `keep` must be the promise the states were enumerated under (the exploration
    records it), so the state's point and pending writes mean what they meant.
    """
    timeline = Timeline(recording.read_log(), keep, recording.acks)
    with StateBuilder(timeline, recording.log, recording.base) as builder:
        return builder.replay(state.on(timeline), out)


def _write_runs(fd: int, table: SectorTable, items: Iterator[tuple[int, Version | None]]) -> int:
    """pwrite sorted (sector, version or None for the base) pairs, coalescing contiguous runs."""
    ss = table.ss
    run_start = -2
    parts: list[bytes] = []
    written = 0

    def flush() -> None:
        if parts:
            os.pwrite(fd, b"".join(parts), run_start * ss)

    for s, v in items:
        data = table.base_sector(s) if v is None else table.data(v)
        if s == run_start + len(parts):
            parts.append(data)
        else:
            flush()
            run_start, parts = s, [data]
        written += 1
    flush()
    return written


class Scratch:
    """One image file that holds one state at a time; moving it rewrites only what differs."""

    def __init__(self, builder: StateBuilder, path: Path | str) -> None:
        self.builder = builder
        self.table = builder.table
        self.path = Path(path)
        sparse_copy(self.table.base.path, self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        # What the file holds where it differs from the base: sector -> digest.
        self.held: dict[int, int] = {}
        self._last_over: set[int] = set()
        self.sectors_written = 0

    def materialize(self, state: State) -> StateView:
        """Make the file hold `state`; returns its view (valid until the next call)."""
        builder = self.builder
        builder.durable.advance(state.point)
        view = StateView(self.table, builder.durable, state)
        changed = builder.durable.take_changed()
        candidates = self.held.keys() | view.durable.keys() if changed is None else changed
        candidates |= self._last_over
        candidates |= view.over.keys()
        self._last_over = set(view.over)
        table = self.table
        held = self.held
        todo: list[tuple[int, Version | None]] = []
        for s in candidates:
            v = view.version(s)
            if v is None or v[4] == 0:
                if s in held:
                    todo.append((s, None))
                    del held[s]
                continue
            if held.get(s) != v[3]:
                todo.append((s, v))
                held[s] = v[3]
        todo.sort(key=lambda item: item[0])
        self.sectors_written += _write_runs(self.fd, table, iter(todo))
        return view

    def forget(self) -> None:
        """The file was changed behind our back and could not be undone: start from the base."""
        os.close(self.fd)
        sparse_copy(self.table.base.path, self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.held.clear()
        self._last_over.clear()
        # Every durable sector must be rewritten at the next state.
        self.builder.durable.changed = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
