"""A recording: one run of a workload, kept so that every crash state can be rebuilt from it.

On disk, a directory:

    recording.json   what this file's `Recording` holds (format below)
    base.img         the disk as it was before the workload (a sparse copy)
    write.log        the `log-writes` log of the workload, with data (`log-data=on`)

`recording.json`:

    {"version": 1, "base": "base.img", "log": "write.log", "image_size": N,
     "sector_size": 512, "base_fingerprint": "blake2b:...", "mode": "writeback",
     "acks": [{"token": "7", "index": 1234}, ...], "extra": {...}}

An acknowledgement is aligned to the log's total order by a record index:
every record before `index` happened before the workload's acknowledgement
was seen on the host. It comes either from a `log-mark` the recorder sent
when the ack arrived (`acks_from_marks`) or from the host's CLOCK_MONOTONIC
time of the ack matched against the log's time stamps (`acks_from_times`,
the same clock: log-writes stamps its records with it). Either way the ack is
placed at or after the moment the guest acknowledged, never before, so a
state cut at that point may still lose only what the contract allows.

The base fingerprint is a digest of the base image's content (holes and
zero blocks alike count as zeroes), so a base that changed since the
recording is refused with a clear message instead of producing garbage states.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.durability.contract import CacheMode
from harness.durability.writelog import LogFlags, WriteLog, read_log
from harness.errors import ConfigError, JournalError
from harness.jsonfile import load_document

RECORDING_FILE = "recording.json"
BASE_NAME = "base.img"
LOG_NAME = "write.log"
RECORDING_VERSION = 1
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)


@dataclass(frozen=True)
class Ack:
    """The workload acknowledged `token`; every log record before `index` happened before it."""

    token: str
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "index": self.index}


@dataclass(frozen=True)
class Recording:
    root: Path
    base: Path
    log: Path
    image_size: int
    sector_size: int
    base_fingerprint: str
    mode: CacheMode
    acks: tuple[Ack, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def read_log(self) -> WriteLog:
        wlog = read_log(self.log)
        require_data(wlog)
        return wlog

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORDING_VERSION,
            "base": _rel(self.base, self.root),
            "log": _rel(self.log, self.root),
            "image_size": self.image_size,
            "sector_size": self.sector_size,
            "base_fingerprint": self.base_fingerprint,
            "mode": self.mode.value,
            "acks": [a.to_json() for a in self.acks],
            "extra": self.extra,
        }


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def require_data(wlog: WriteLog) -> None:
    """Refuse a log that cannot rebuild states: it must keep the data of every write."""
    if not wlog.header.flags & LogFlags.DATA:
        raise JournalError(
            f"write log {wlog.path} was recorded without data, so its crash states cannot be "
            "rebuilt; record the run with log-data=on on the log-writes node"
        )


def fingerprint(image: Path | str) -> str:
    """A digest of the image's content: its size and every non-zero 1 MiB chunk with its index.

    Holes are skipped with SEEK_DATA, so a mostly empty sparse image is hashed
    in the time its data takes to read.
    """
    image = Path(image)
    h = hashlib.blake2b(digest_size=20)
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"base image {image} does not exist") from None
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        for start, end in _data_extents(fd, size):
            chunk = start - start % _CHUNK
            while chunk < end:
                data = os.pread(fd, _CHUNK, chunk)
                if data.rstrip(b"\0"):
                    h.update(chunk.to_bytes(8, "little"))
                    h.update(data.ljust(min(_CHUNK, size - chunk), b"\0"))
                chunk += _CHUNK
    finally:
        os.close(fd)
    return "blake2b:" + h.hexdigest()


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the file's data, merged to whole chunks; the whole file without SEEK_DATA."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            a = start - start % _CHUNK
            b = min(size, -(-end // _CHUNK) * _CHUNK)
            if extents and a <= extents[-1][1]:
                extents[-1] = (extents[-1][0], max(b, extents[-1][1]))
            else:
                extents.append((a, b))
            pos = end
    except (AttributeError, OSError):
        return [(0, size)]
    return extents


def sparse_copy(src: Path | str, dst: Path | str) -> None:
    """Copy an image keeping its holes (only the data extents are copied)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dfd, size)
            for start, end in _data_extents(sfd, size):
                pos = start
                while pos < end:
                    data = os.pread(sfd, min(_CHUNK, end - pos), pos)
                    if not data:
                        break
                    if data != _ZERO_CHUNK[: len(data)]:
                        os.pwrite(dfd, data, pos)
                    pos += len(data)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def snapshot_base(image: Path | str, root: Path | str) -> Path:
    """Before the workload: keep a sparse copy of `image` as the recording's base."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = root / BASE_NAME
    sparse_copy(image, base)
    return base


def write_recording(
    root: Path | str,
    *,
    mode: CacheMode,
    acks: Sequence[Ack] = (),
    base: Path | str | None = None,
    log: Path | str | None = None,
    extra: dict[str, Any] | None = None,
) -> Recording:
    """After the workload: describe the recording in ROOT/recording.json (fingerprints the base)."""
    root = Path(root)
    base_path = Path(base) if base is not None else root / BASE_NAME
    log_path = Path(log) if log is not None else root / LOG_NAME
    wlog = read_log(log_path)
    require_data(wlog)
    size = base_path.stat().st_size
    _check_acks(acks, wlog)
    rec = Recording(
        root=root,
        base=base_path,
        log=log_path,
        image_size=size,
        sector_size=wlog.header.sector_size,
        base_fingerprint=fingerprint(base_path),
        mode=mode,
        acks=tuple(acks),
        extra=dict(extra or {}),
    )
    tmp = root / f"{RECORDING_FILE}.tmp"
    tmp.write_text(json.dumps(rec.to_json(), indent=1) + "\n")
    os.replace(tmp, root / RECORDING_FILE)
    return rec


def open_recording(root: Path | str, *, verify_base: bool = True) -> Recording:
    """Read ROOT/recording.json; refuse a log without data or a base that changed since."""
    root = Path(root)
    path = root / RECORDING_FILE
    raw = load_document(
        path,
        "a recording",
        version=RECORDING_VERSION,
        marker="log",
        missing=f"{root} is not a recording (no {RECORDING_FILE}); record the run first",
    )
    rec = Recording(
        root=root,
        base=root / raw["base"],
        log=root / raw["log"],
        image_size=int(raw["image_size"]),
        sector_size=int(raw["sector_size"]),
        base_fingerprint=str(raw["base_fingerprint"]),
        mode=_mode(raw["mode"], path),
        acks=tuple(Ack(str(a["token"]), int(a["index"])) for a in raw.get("acks", [])),
        extra=dict(raw.get("extra", {})),
    )
    if verify_base:
        verify_base_image(rec)
    return rec


def _mode(value: Any, path: Path) -> CacheMode:
    try:
        return CacheMode(value)
    except ValueError:
        raise ConfigError(f"{path}: 'mode' {value!r} is not a cache mode") from None


def verify_base_image(rec: Recording) -> None:
    try:
        size = rec.base.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"the recording's base image {rec.base} is missing") from None
    if size != rec.image_size or fingerprint(rec.base) != rec.base_fingerprint:
        raise ConfigError(
            f"base image {rec.base} changed since the recording (fingerprint or size differs); "
            "its crash states would be wrong — record the run again"
        )


def _check_acks(acks: Iterable[Ack], wlog: WriteLog) -> None:
    for a in acks:
        if not 0 <= a.index <= wlog.records:
            raise ConfigError(
                f"ack {a.token!r} is placed at log record {a.index}, outside the log "
                f"(0..{wlog.records})"
            )


def acks_from_marks(wlog: WriteLog, prefix: str = "ack ") -> list[Ack]:
    """Acks the recorder marked in the log (`log-mark` with label PREFIX+TOKEN), in log order."""
    return [
        Ack(label[len(prefix) :], index + 1)
        for index, label in wlog.marks
        if label.startswith(prefix)
    ]


def acks_from_times(wlog: WriteLog, acks: Iterable[tuple[str, int]]) -> list[Ack]:
    """Acks seen at host CLOCK_MONOTONIC times, placed after every log record stamped no later."""
    events: list[tuple[int, int]] = []
    for r in wlog.requests:
        events.append((r.submit_ns, r.submit_index))
        if r.complete_index is not None and r.complete_ns is not None:
            events.append((r.complete_ns, r.complete_index))
    events.sort()
    times = [t for t, _i in events]
    # The highest record index stamped at or before each event time (records are appended
    # in time order, but take the running maximum so a tie never moves an ack backwards).
    best: list[int] = []
    top = -1
    for _t, i in events:
        top = max(top, i)
        best.append(top)
    out = []
    for token, ns in acks:
        k = bisect.bisect_right(times, ns)
        out.append(Ack(str(token), best[k - 1] + 1 if k else 0))
    return out
