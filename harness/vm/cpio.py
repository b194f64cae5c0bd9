"""A newc ("070701") cpio writer and reader, for the guest initramfs.

Written here rather than by calling cpio(1) so every entry is owned by root
with the mode we choose and the archive is byte-for-byte reproducible
(mtime 0), whatever the builder's umask or user.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# The newc header: magic + 13 fields of 8 hex digits (see the kernel's
# Documentation/driver-api/early-userspace/buffer-format.rst).
MAGIC = b"070701"
HEADER_LEN = 110
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading "/"
    mode: int  # full st_mode: type bits and permissions
    data: bytes = b""  # file contents, or a symlink's target
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def add(self, entry: CpioEntry) -> None:
        if entry.name in self._names:
            raise ValueError(f"duplicate cpio entry {entry.name!r}")
        self._names.add(entry.name)
        self._write(entry)

    def _write(self, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            self._ino,
            entry.mode,
            0,
            0,
            nlink,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev_major,
            entry.rdev_minor,
            len(name),
            0,
        )
        self._ino += 1
        header = MAGIC + b"".join(b"%08x" % f for f in fields)
        self._out.write(header + name + b"\0" * _pad4(HEADER_LEN + len(name)))
        self._out.write(entry.data + b"\0" * _pad4(len(entry.data)))

    def close(self) -> None:
        self._write(CpioEntry(TRAILER, 0))


def read_cpio(data: bytes) -> Iterator[CpioEntry]:
    """The entries of a newc archive, without the trailer (for tests and inspection)."""
    pos = 0
    while True:
        if data[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += HEADER_LEN
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + _pad4(HEADER_LEN + namesize)
        body = data[pos : pos + filesize]
        pos += filesize + _pad4(filesize)
        if name == TRAILER:
            return
        yield CpioEntry(name, mode, body, rmaj, rmin)
