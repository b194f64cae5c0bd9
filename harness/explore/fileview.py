"""A file view of a tree: what each entry is, what it holds, and where on the disk.

The model of `harness.guest.fileview`'s listing, pure (no guest): the
explanation (harness/explore/causes.py) compares the workload's tree as the
filesystem recovered it with what the calls made of it, and maps the lost
and torn writes of the disk to files and offsets through each file's
extents (FIEMAP's, which ext4, xfs, btrfs and f2fs all answer).

FIEMAP's physical addresses are the filesystem's: byte offsets on the block
device for ext4, xfs and f2fs, but btrfs's own logical addresses, which its
chunk tree maps to the device. On btrfs the view carries that map
(`btrfs inspect-internal dump-tree -t chunk`, parsed by `parse_chunk_tree`)
and `device_extents` translates. Extents flagged inline (the data sits in
metadata), encoded (compressed), delayed (not allocated yet) or unknown have
no device location of their own and are reported as such, never guessed.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import GuestError

MAX_ENTRIES = 10_000
MAX_BYTES = 64 << 20

# <linux/fiemap.h>
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
_NOWHERE = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)


class EntryType(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"
    GONE = "gone"  # listed by readdir, gone by lstat (the tree changed under the walk)


@dataclass(frozen=True)
class Extent:
    """A piece of a file: `length` bytes at file offset `logical`, at `physical` (FIEMAP's)."""

    logical: int
    physical: int
    length: int
    flags: int = 0

    @property
    def located(self) -> bool:
        """Whether `physical` is a place on the disk (not inline, compressed or unknown)."""
        return not self.flags & _NOWHERE

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the view's root
    type: EntryType
    size: int = 0
    mode: int = 0
    inode: int = 0
    nlink: int = 0
    md5: str | None = None
    partial: bool = False  # the digest covers only the first MAX_BYTES
    target: str | None = None  # a symlink's
    extents: tuple[Extent, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "type": self.type.value}
        for key in ("size", "mode", "inode", "nlink"):
            out[key] = getattr(self, key)
        for key in ("md5", "target", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.partial:
            out["partial"] = True
        if self.extents:
            out["extents"] = [[e.logical, e.physical, e.length, e.flags] for e in self.extents]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FileEntry:
        return cls(
            path=str(raw["path"]),
            type=EntryType(raw.get("type", "other")),
            size=int(raw.get("size", 0)),
            mode=int(raw.get("mode", 0)),
            inode=int(raw.get("inode", 0)),
            nlink=int(raw.get("nlink", 0)),
            md5=raw.get("md5"),
            partial=bool(raw.get("partial", False)),
            target=raw.get("target"),
            extents=tuple(Extent(*map(int, e)) for e in raw.get("extents", ())),
            error=raw.get("error"),
        )


@dataclass(frozen=True)
class Chunk:
    """btrfs: `length` bytes of its logical address space at `logical` sit at device `physical`."""

    logical: int
    length: int
    physical: int


@dataclass(frozen=True)
class FileView:
    """A tree as one walk saw it; `root` is where it was mounted, paths are relative to it."""

    root: str
    filesystem: str
    entries: tuple[FileEntry, ...] = ()
    truncated: bool = False
    chunks: tuple[Chunk, ...] = ()  # btrfs only

    def by_path(self) -> dict[str, FileEntry]:
        return {e.path: e for e in self.entries}

    def get(self, path: str) -> FileEntry | None:
        """An entry by its absolute path (under `root`) or its relative one."""
        rel = self.relative(path)
        return None if rel is None else self.by_path().get(rel)

    def relative(self, path: str) -> str | None:
        root = self.root.rstrip("/")
        if path == root:
            return ""
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return None if path.startswith("/") else path

    def device_extents(self, entry: FileEntry) -> Iterator[tuple[int, int, int]]:
        """(file offset, device byte offset, length) of each located extent of `entry`."""
        for e in entry.extents:
            if not e.located:
                continue
            if self.filesystem != "btrfs":
                yield e.logical, e.physical, e.length
                continue
            # Split the extent along the chunks its logical range crosses.
            done = 0
            while done < e.length:
                at = e.physical + done
                chunk = next(
                    (c for c in self.chunks if c.logical <= at < c.logical + c.length), None
                )
                if chunk is None:
                    break  # not in the map: say nothing rather than guess
                n = min(e.length - done, chunk.logical + chunk.length - at)
                yield e.logical + done, chunk.physical + (at - chunk.logical), n
                done += n

    def files_at(self, offset: int, length: int) -> list[tuple[str, int, int]]:
        """The files that hold device bytes [offset, offset+length): (path, file offset, length)."""
        out: list[tuple[str, int, int]] = []
        end = offset + length
        for entry in self.entries:
            if entry.type is not EntryType.FILE:
                continue
            for logical, physical, n in self.device_extents(entry):
                lo, hi = max(offset, physical), min(end, physical + n)
                if lo < hi:
                    out.append((entry.path, logical + (lo - physical), hi - lo))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "filesystem": self.filesystem,
            "truncated": self.truncated,
            "entries": [e.to_json() for e in self.entries],
            "chunks": [[c.logical, c.length, c.physical] for c in self.chunks],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FileView:
        return cls(
            root=str(raw["root"]),
            filesystem=str(raw["filesystem"]),
            entries=tuple(FileEntry.from_json(e) for e in raw.get("entries", ())),
            truncated=bool(raw.get("truncated", False)),
            chunks=tuple(Chunk(*map(int, c)) for c in raw.get("chunks", ())),
        )


def parse_view(text: str, root: str, filesystem: str, chunks: Sequence[Chunk] = ()) -> FileView:
    """The helper's output to a view; a walk that did not reach its end is an error."""
    entries: list[FileEntry] = []
    end: dict[str, Any] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GuestError(f"the file view helper printed {line[:120]!r}: {exc}") from None
        if raw.get("end"):
            end = raw
            break
        for key in ("path", "target"):
            if isinstance(raw.get(key), str):
                raw[key] = _bytes_text(raw[key])
        entries.append(FileEntry.from_json(raw))
    if end is None:
        raise GuestError(
            f"the file view of {root} ended early after {len(entries)} entries "
            "(the helper died; its stderr says why)"
        )
    return FileView(root, filesystem, tuple(entries), bool(end.get("truncated")), tuple(chunks))


def _bytes_text(latin: str) -> str:
    """A name the helper sent as Latin-1 code points (its bytes), as the UTF-8 it spells."""
    try:
        return latin.encode("latin-1").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return latin


_CHUNK_KEY = re.compile(r"key \(FIRST_CHUNK_TREE CHUNK_ITEM (\d+)\)")
_CHUNK_LENGTH = re.compile(r"^\s*length (\d+) owner")
_STRIPE = re.compile(r"^\s*stripe 0 devid \d+ offset (\d+)")


def parse_chunk_tree(text: str) -> tuple[Chunk, ...]:
    """`btrfs inspect-internal dump-tree -t chunk DEVICE` to the logical → device map.

    Only a chunk's first stripe is kept: on one device a DUP chunk's two
    copies hold the same bytes, and data chunks are single.
    """
    chunks: list[Chunk] = []
    logical: int | None = None
    length: int | None = None
    for line in text.splitlines():
        if m := _CHUNK_KEY.search(line):
            logical, length = int(m.group(1)), None
        elif (m := _CHUNK_LENGTH.match(line)) and logical is not None:
            length = int(m.group(1))
        elif (m := _STRIPE.match(line)) and logical is not None and length is not None:
            chunks.append(Chunk(logical, length, int(m.group(1))))
            logical = length = None
    return tuple(sorted(chunks, key=lambda c: c.logical))


def differences(recovered: FileView, reference: FileView) -> list[tuple[str, str]]:
    """(path, what differs) between a recovered tree and its reference, path by path."""
    out: list[tuple[str, str]] = []
    got, want = recovered.by_path(), reference.by_path()
    for path in sorted(set(got) | set(want)):
        a, b = got.get(path), want.get(path)
        if a is None and b is not None:
            out.append((path, f"missing (the reference has a {b.type.value} of {b.size} bytes)"))
        elif b is None and a is not None:
            out.append((path, f"present (a {a.type.value}), absent from the reference"))
        elif a is not None and b is not None:
            out.extend((path, d) for d in _entry_differences(a, b))
    return out


def _entry_differences(a: FileEntry, b: FileEntry) -> Iterable[str]:
    if a.type is not b.type:
        yield f"a {a.type.value} where the reference has a {b.type.value}"
        return
    if a.type is EntryType.FILE:
        if a.size != b.size:
            yield f"{a.size} bytes where the reference has {b.size}"
        elif a.md5 != b.md5:
            yield "other content, same size"
    if a.type is EntryType.SYMLINK and a.target != b.target:
        yield f"points to {a.target!r}, the reference to {b.target!r}"
