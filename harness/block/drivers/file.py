"""The `file` protocol driver: a host file or block device, as QEMU's file-posix.

Reads and writes go straight to `preadv`/`pwritev` with the caller's buffers.
With `cache.direct` the file is opened O_DIRECT; the request alignment comes
from the host (statx's DIO alignment, else probing reads, as QEMU's
`raw_probe_alignment`), and requests that do not fit it go through aligned
bounce buffers (read-modify-write for writes, serialized against each other).
A flush is `fdatasync`. Discard punches a hole; write-zeroes tries the same
fallocate calls as file-posix, in the same order, and falls back to writing
zeroes when the filesystem has none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags, iov_length
from harness.block.registry import register_driver
from harness.errors import BlockError, ConfigError

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# statx(2): the fields we need from struct statx (include/uapi/linux/stat.h).
_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256
_STATX_MASK = struct.Struct("=I")  # stx_mask at offset 0
_STATX_DIOALIGN_FIELDS = struct.Struct("=II")  # stx_dio_mem_align, stx_dio_offset_align
_STATX_DIOALIGN_OFFSET = 152

_PAGE = mmap.PAGESIZE
_MAX_PROBE_ALIGN = 4096


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _statx_dio_align(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) for O_DIRECT, if the kernel reports them."""
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    (mask,) = _STATX_MASK.unpack_from(buf.raw, 0)
    if not mask & _STATX_DIOALIGN:
        return None
    mem, off = _STATX_DIOALIGN_FIELDS.unpack_from(buf.raw, _STATX_DIOALIGN_OFFSET)
    return (mem, off) if off else None


def _probe_align(fd: int) -> int:
    """The smallest read size O_DIRECT accepts at offset 0 (raw_probe_alignment)."""
    buf = mmap.mmap(-1, _MAX_PROBE_ALIGN)
    try:
        for align in (1, 512, 1024, 2048, 4096):
            try:
                os.preadv(fd, [memoryview(buf)[:align]], 0)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue
                raise
            # A 1-byte read that works tells nothing (e.g. an empty file): assume the most.
            return align if align != 1 else _MAX_PROBE_ALIGN
    finally:
        buf.close()
    raise ConfigError("could not find a working O_DIRECT alignment; try cache.direct=off")


@register_driver
class FileNode(BlockNode):
    driver = "file"
    options = {
        "filename": Option(str, required=True, help="host file or block device"),
        # Accepted so command lines written for QEMU work unchanged: requests always go
        # through threads here (the submission path changes no durability semantics),
        # and no image locks are taken.
        "aio": Option(str, default="threads", choices=("threads", "native", "io_uring")),
        "locking": Option(str, default="auto", choices=("auto", "on", "off")),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        self.filename = str(opts["filename"])
        mode = os.O_RDONLY if flags.read_only else os.O_RDWR
        mode |= os.O_CLOEXEC | (os.O_DIRECT if flags.direct else 0)
        try:
            self.fd = os.open(self.filename, mode)
        except OSError as exc:
            hint = (
                "; create it first (e.g. truncate -s 1G FILE)" if exc.errno == errno.ENOENT else ""
            )
            if exc.errno == errno.EINVAL and flags.direct:
                hint = "; the filesystem may not support O_DIRECT: try cache.direct=off"
            raise ConfigError(f"could not open {self.filename!r}: {exc.strerror}{hint}") from exc
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._length = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        self.direct = flags.direct
        self.mem_alignment = 1
        if flags.direct:
            dio = _statx_dio_align(self.fd)
            if dio is not None:
                self.mem_alignment, self.request_alignment = dio
            else:
                self.request_alignment = _probe_align(self.fd)
                self.mem_alignment = self.request_alignment
        self.supported_zero_flags = RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
        self.can_discard = True
        self.can_write_zeroes = True
        self._has_zero_range = True
        self._has_punch = True
        self._has_fallocate = True
        # Under O_DIRECT a misaligned write is a read-modify-write of whole aligned
        # blocks; no other modification of those blocks may land in between, or the
        # write-back would undo it (QEMU serializes such requests the same way).
        self._ranges = _RangeLock()
        self._count_lock = threading.Lock()
        # Observability: what reached the host.
        self.host_syncs = 0
        self.bounced = 0
        self.in_flight = 0
        self.max_in_flight = 0

    # -- reads and writes ----------------------------------------------------

    def driver_length(self) -> int:
        return self._length

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        if self.direct:
            self._direct_io(offset, iov, iov_length(iov), write=False)
            return
        n = os.preadv(self.fd, iov, offset)
        if len(iov) != 1 or n != len(iov[0]):
            length = iov_length(iov)
            if n != length:
                self._finish_read(offset, iov, length, n)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        if self.direct:
            self._direct_io(offset, iov, iov_length(iov), write=True)
            return
        n = os.pwritev(self.fd, iov, offset)
        if len(iov) != 1 or n != len(iov[0]):
            length = iov_length(iov)
            if n != length:
                self._finish_write(offset, iov, length, n)

    def _finish_read(self, offset: int, iov: IOVec, length: int, done: int) -> None:
        """Short reads: keep reading; beyond the end of the file reads as zeroes."""
        while done < length:
            rest = _iov_tail(iov, done)
            n = os.preadv(self.fd, rest, offset + done)
            if n == 0:
                for view in rest:
                    view[:] = bytes(len(view))
                return
            done += n

    def _finish_write(self, offset: int, iov: IOVec, length: int, done: int) -> None:
        while done < length:
            n = os.pwritev(self.fd, _iov_tail(iov, done), offset + done)
            if n == 0:
                raise BlockError(f"write to {self.filename!r} made no progress", errno.EIO)
            done += n

    def _direct_io(self, offset: int, iov: IOVec, length: int, *, write: bool) -> None:
        align = self.request_alignment
        with self._count_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        held: tuple[int, int] | None = None
        try:
            if write:
                held = self._ranges.acquire(
                    offset - offset % align, -(-(offset + length) // align) * align
                )
            if (offset | length) & (align - 1):
                self._bounce(offset, iov, length, write=write)
                return
            try:
                if write:
                    n = os.pwritev(self.fd, iov, offset)
                    if n != length:
                        self._finish_write(offset, iov, length, n)
                else:
                    n = os.preadv(self.fd, iov, offset)
                    if n != length:
                        self._finish_read(offset, iov, length, n)
            except OSError as exc:
                # Aligned offset and length, so it is the buffers' memory alignment.
                if exc.errno != errno.EINVAL:
                    raise
                self._bounce(offset, iov, length, write=write)
        finally:
            if held is not None:
                self._ranges.release(held)
            with self._count_lock:
                self.in_flight -= 1

    def _bounce(self, offset: int, iov: IOVec, length: int, *, write: bool) -> None:
        """Do a request through an aligned buffer covering the aligned range around it."""
        align = self.request_alignment
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        self.bounced += 1
        buf = mmap.mmap(-1, max(end - start, _PAGE))
        try:
            window = memoryview(buf)[: end - start]
            head = offset - start
            if write:
                # The caller holds the range lock over [start, end).
                if head or end != offset + length:
                    self._read_window(start, window)
                pos = head
                for view in iov:
                    window[pos : pos + len(view)] = view
                    pos += len(view)
                n = os.pwritev(self.fd, [window], start)
                if n != len(window):
                    self._finish_write(start, [window], len(window), n)
                if end > self._length and not self.is_block_device:
                    # The aligned window ran past the end of an unaligned file.
                    os.ftruncate(self.fd, self._length)
            else:
                self._read_window(start, window)
                pos = head
                for view in iov:
                    view[:] = window[pos : pos + len(view)]
                    pos += len(view)
            window.release()
        finally:
            buf.close()

    def _read_window(self, start: int, window: memoryview) -> None:
        n = os.preadv(self.fd, [window], start)
        if n < len(window):
            # The aligned window runs past the end of an unaligned file: that part is zeroes.
            window[n:] = bytes(len(window) - n)

    # -- flush, discard, write-zeroes ------------------------------------------

    def driver_flush_to_disk(self) -> None:
        os.fdatasync(self.fd)
        self.host_syncs += 1

    def _aligned_range(self, offset: int, length: int) -> tuple[int, int]:
        align = self.request_alignment
        return offset - offset % align, -(-(offset + length) // align) * align

    def driver_pdiscard(self, offset: int, length: int) -> None:
        if not self._has_punch:
            return
        if self.direct:
            with self._ranges.held(*self._aligned_range(offset, length)):
                self._punch(offset, length)
        else:
            self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # Discard is advisory: without hole punching it does nothing, as in QEMU.
            self._has_punch = False

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        if self.direct:
            with self._ranges.held(*self._aligned_range(offset, length)):
                done = self._fallocate_zeroes(offset, length, flags)
        else:
            done = self._fallocate_zeroes(offset, length, flags)
        if done:
            return
        if RequestFlags.NO_FALLBACK in flags:
            raise BlockError(
                f"{self.filename!r}: the filesystem cannot write zeroes without writing a buffer",
                errno.ENOTSUP,
            )
        self._write_zero_buffer(offset, length, RequestFlags.NONE)

    def _fallocate_zeroes(self, offset: int, length: int, flags: RequestFlags) -> bool:
        """handle_aiocb_write_zeroes(_unmap): the fallocate calls file-posix tries, in order."""
        if RequestFlags.MAY_UNMAP in flags and self._has_punch and getattr(self, "unmap", True):
            # A hole reads as zeroes.
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._has_punch = False
        if self._has_fallocate and not self.is_block_device and offset >= self._length:
            try:
                fallocate(self.fd, 0, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._has_fallocate = False
        if self._has_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._has_zero_range = False
        if self._has_punch and self._has_fallocate:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                fallocate(self.fd, 0, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._has_punch = False
        return False

    def driver_close(self) -> None:
        os.close(self.fd)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {
                "filename": self.filename,
                "direct": self.direct,
                "request-alignment": self.request_alignment,
                "host-syncs": self.host_syncs,
                "bounced": self.bounced,
            }
        )
        return info


class _RangeLock:
    """Holds byte ranges; a range waits while any overlapping one is held."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        key = (start, end)
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append(key)
        return key

    def release(self, key: tuple[int, int]) -> None:
        with self._cond:
            self._held.remove(key)
            self._cond.notify_all()

    @contextlib.contextmanager
    def held(self, start: int, end: int) -> Iterator[None]:
        key = self.acquire(start, end)
        try:
            yield
        finally:
            self.release(key)


def _iov_tail(iov: IOVec, skip: int) -> list[memoryview]:
    """The part of an iovec after its first `skip` bytes."""
    rest: list[memoryview] = []
    for view in iov:
        view = memoryview(view)
        if skip >= len(view):
            skip -= len(view)
            continue
        rest.append(view[skip:] if skip else view)
        skip = 0
    return rest
