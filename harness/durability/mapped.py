"""Append-only record files written through a shared memory mapping.

The powerfail journal and the write log append a record or two per guest
write. A `write(2)` per record was a system call each, and made it worth
holding small records back in memory (where a killed process lost them).
Stores into a `MAP_SHARED` mapping land in the host page cache directly: a
SIGKILLed process loses none of them, exactly as with `write(2)`, without a
system call per record — so nothing needs to be held back any more.

The file is grown ahead of the records (zero-filled, by doubling, its blocks
allocated at once so that a full disk is an error then and not a SIGBUS on a
store later), so it may end in zero padding; the readers treat an all-zero tail as unused space, not
as a torn record. A record is stored payload first and header last, so a
record whose header is whole was stored whole: a process killed mid-record
leaves at most a partial header (the readers check it by its CRC) and
payload bytes in the padding. `close()` truncates the padding away.

The file must not be truncated by anyone else while it is mapped (that would
SIGBUS the writer); the journal and log belong to one backend process at a
time, and `powercut cut` runs after it is gone.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

from harness.errors import JournalError

_MIN_SPARE = 32 << 10  # bytes of padding at least, once mapped
_MAX_STEP = 64 << 20  # grow by doubling, at most this much at a time
_NONZERO = re.compile(rb"[^\x00]")


def all_zero(data: bytes | mmap.mmap, start: int) -> bool:
    """True if every byte of `data` from `start` on is zero (unused, preallocated space)."""
    return _NONZERO.search(data, start) is None


def last_nonzero(data: bytes | mmap.mmap, start: int) -> int:
    """One past the last non-zero byte at or after `start` (`start` if there is none)."""
    end = len(data)
    step = 1 << 16
    while end > start:
        lo = max(start, end - step)
        chunk = data[lo:end]
        stripped = len(chunk.rstrip(b"\x00"))
        if stripped:
            return lo + stripped
        end = lo
        step = min(step * 2, 16 << 20)
    return start


class MappedAppender:
    """The growing end of one record file: `append` stores a record, header last."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size  # bytes of records (the logical length)
        self._capacity = 0
        self._mm: mmap.mmap | None = None
        self._grow(size + 1)

    def _grow(self, need: int) -> None:
        cap = max(need + _MIN_SPARE, min(2 * self._capacity, self._capacity + _MAX_STEP))
        cap = -(-cap // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            # Blocks first: a full disk is an error here, not a SIGBUS on a store later.
            os.posix_fallocate(self._fd, self._capacity, cap - self._capacity)
            if self._mm is None:
                self._mm = mmap.mmap(self._fd, cap)
            else:
                self._mm.resize(cap)
        except OSError as exc:
            raise JournalError(
                f"cannot grow {self.path} to {cap} bytes ({exc.strerror}); is the disk full?"
            ) from exc
        self._capacity = cap

    def append(self, head: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        pos = self.size
        mid = pos + len(head)
        end = mid + len(payload)
        if end > self._capacity:
            self._grow(end)
        mm = self._mm
        assert mm is not None
        if payload:
            mm[mid:end] = payload
        mm[pos:mid] = head  # last: a whole header means a whole record
        self.size = end

    def restart(self, header: bytes) -> None:
        """Start over in place with only `header`, keeping the file's pages.

        The header goes in with one `pwrite(2)` (a process cannot be killed halfway
        through a small write), so every state a crash leaves has either the old
        header and records or the new header; the caller must make the old records
        invalid under the new header (the journal seeds record CRCs with it). The old
        records are then zeroed so the file reads as the header and padding.
        """
        if os.pwrite(self._fd, header, 0) != len(header):
            raise JournalError(f"short write to {self.path}; is the disk full?")
        mm = self._mm
        assert mm is not None
        old = self.size
        self.size = len(header)
        if old > self.size:
            mm[self.size : old] = bytes(old - self.size)

    def close(self) -> None:
        """Unmap and cut the padding off, leaving exactly the records."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        os.ftruncate(self._fd, self.size)
