"""What a write's blocks hold on ext4: metadata by the group layout, the rest by debugfs.

Best effort, read-only, on any image (the base or a replayed state): the
layout from `dumpe2fs` names superblocks, group descriptors, reserved GDT
blocks, bitmaps and inode tables (with the inode numbers a table block holds,
and their paths); every other block is asked of `debugfs icheck` (which inode
owns it) and `ncheck`/`stat` (its path and whether it is a directory, the
journal or a file's data). Anything the tools cannot tell is "unknown";
a non-ext* image gets no attribution (an empty list) rather than an error.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.explore.doc import Loss, LostWrite
from harness.explore.states import State, Timeline

log = logging.getLogger(__name__)

_RANGE = r"(\d+)(?:-(\d+))?"
_LAYOUT_LINES = [
    ("superblock", re.compile(r"(?:Primary|Backup) superblock at " + _RANGE)),
    ("group-descriptors", re.compile(r"Group descriptors at " + _RANGE)),
    ("reserved-gdt", re.compile(r"Reserved GDT blocks at " + _RANGE)),
    ("block-bitmap", re.compile(r"Block bitmap at " + _RANGE)),
    ("inode-bitmap", re.compile(r"Inode bitmap at " + _RANGE)),
    ("inode-table", re.compile(r"Inode table at " + _RANGE)),
]


@dataclass(frozen=True)
class BlockRole:
    block: int
    kind: str  # superblock, group-descriptors, ..., inode-table, journal, directory, file, unused
    inode: int | None = None
    path: str | None = None
    inodes: tuple[int, int] | None = None  # an inode-table block: first and last inode
    paths: tuple[str, ...] = ()  # an inode-table block: the paths of its inodes in use

    def describe(self) -> str:
        if self.kind == "inode-table" and self.inodes:
            who = f" ({', '.join(self.paths)})" if self.paths else ""
            return f"inode table, inodes {self.inodes[0]}-{self.inodes[1]}{who}"
        if self.kind in ("directory", "file"):
            what = "directory block of" if self.kind == "directory" else "data of"
            return f"{what} {self.path or f'inode {self.inode}'}"
        return self.kind.replace("-", " ")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "describe": self.describe()}


@dataclass
class Ext4Layout:
    block_size: int
    inodes_per_group: int
    inode_size: int
    journal_inode: int | None
    ranges: list[tuple[int, int, str, int]] = field(default_factory=list)  # (lo, hi, kind, group)

    @classmethod
    def from_image(cls, image: Path | str) -> Ext4Layout | None:
        run = subprocess.run(
            ["dumpe2fs", str(image)],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},  # its labels are parsed: never translated
            check=False,
            close_fds=False,
        )
        if run.returncode != 0:
            return None
        head: dict[str, str] = {}
        ranges: list[tuple[int, int, str, int]] = []
        group = -1
        for line in run.stdout.splitlines():
            m = re.match(r"Group (\d+):", line)
            if m:
                group = int(m.group(1))
            elif group < 0 and ":" in line:
                key, _, value = line.partition(":")
                head[key.strip()] = value.strip()
            if group < 0:
                continue
            for part in line.split(","):
                for kind, pattern in _LAYOUT_LINES:
                    m = pattern.search(part)
                    if m:
                        lo = int(m.group(1))
                        ranges.append((lo, int(m.group(2) or lo), kind, group))
        try:
            return cls(
                int(head["Block size"]),
                int(head["Inodes per group"]),
                int(head.get("Inode size", "256")),
                int(head["Journal inode"]) if "Journal inode" in head else None,
                sorted(ranges),
            )
        except (KeyError, ValueError):
            return None

    def metadata(self, block: int) -> BlockRole | None:
        for lo, hi, kind, group in self.ranges:
            if lo <= block <= hi:
                if kind == "inode-table":
                    per_block = self.block_size // self.inode_size
                    first = group * self.inodes_per_group + (block - lo) * per_block + 1
                    return BlockRole(block, kind, inodes=(first, first + per_block - 1))
                return BlockRole(block, kind)
        return None


def _debugfs(image: Path | str, commands: Sequence[str]) -> str:
    run = subprocess.run(
        ["debugfs", "-f", "-", str(image)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
        close_fds=False,
    )
    return run.stdout


def attribute_extents(
    image: Path | str, extents: Sequence[tuple[int, int]], *, max_blocks: int = 64
) -> list[list[BlockRole]]:
    """For each (byte offset, length): the roles of (at most `max_blocks` of) its fs blocks."""
    layout = Ext4Layout.from_image(image)
    if layout is None:
        return [[] for _ in extents]
    bs = layout.block_size
    per_extent: list[list[int]] = []
    for offset, length in extents:
        first, last = offset // bs, (offset + max(length, 1) - 1) // bs
        per_extent.append(list(range(first, min(last, first + max_blocks - 1) + 1)))
    roles: dict[int, BlockRole] = {}
    ask: list[int] = []
    for block in sorted({b for blocks in per_extent for b in blocks}):
        meta = layout.metadata(block)
        if meta is not None:
            roles[block] = meta
        else:
            ask.append(block)
    owners: dict[int, int] = {}
    if ask:
        for line in _debugfs(image, [f"icheck {' '.join(map(str, ask))}"]).splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0].isdigit() and parts[1].strip().isdigit():
                owners[int(parts[0])] = int(parts[1])
    table_inodes: set[int] = set()
    for role in roles.values():
        if role.inodes:
            table_inodes.update(range(role.inodes[0], role.inodes[1] + 1))
    wanted = sorted(set(owners.values()) | table_inodes)
    paths: dict[int, str] = {}
    types: dict[int, str] = {}
    if wanted:
        commands = [f"ncheck -c {' '.join(map(str, wanted))}"]
        commands += [f"stat <{i}>" for i in sorted(set(owners.values()))]
        out = _debugfs(image, commands)
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0].strip().isdigit():
                paths.setdefault(int(parts[0]), re.sub("/+", "/", parts[1].strip()))
            m = re.match(r"Inode: (\d+)\s+Type: (\S+)", line)
            if m:
                types[int(m.group(1))] = m.group(2)
    for block in ask:
        ino = owners.get(block)
        if ino is None:
            roles[block] = BlockRole(block, "unused")
        elif ino == layout.journal_inode:
            roles[block] = BlockRole(block, "journal", inode=ino)
        else:
            kind = "directory" if types.get(ino) == "directory" else "file"
            roles[block] = BlockRole(block, kind, inode=ino, path=paths.get(ino))
    for block, role in list(roles.items()):
        if role.inodes:
            lo, hi = role.inodes
            named = tuple(paths[i] for i in range(lo, hi + 1) if i in paths)
            roles[block] = BlockRole(block, role.kind, inodes=role.inodes, paths=named)
    return [[roles[b] for b in blocks] for blocks in per_extent]


def loss_report(
    timeline: Timeline, state: State, image: Path | str | None = None
) -> list[LostWrite]:
    """Each write `state` loses or tears: offset, length, when (log order, flush epoch), and,
    with an ext4 `image` (the base, or the state replayed), what its blocks hold."""
    losses: list[tuple[Loss, int, tuple[int, ...]]] = [(Loss.LOST, seq, ()) for seq in state.lost]
    losses += [(Loss.TORN, seq, sectors) for seq, sectors in state.torn]
    writes = [timeline.by_seq[seq] for _kind, seq, _s in losses]
    roles: list[list[BlockRole]] = (
        attribute_extents(image, [(w.offset, w.length) for w in writes])
        if image is not None
        else [[] for _ in writes]
    )
    return [
        LostWrite.of(w, kind, sorted({r.describe() for r in blocks}), sectors)
        for (kind, _seq, sectors), w, blocks in zip(losses, writes, roles, strict=True)
    ]
