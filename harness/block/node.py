"""A node in the block graph: the generic request layer every driver sits under.

This is powercut's `block/io.c`. A driver (file, raw, null, throttle,
powerfail, log-writes, blkdebug, ...) subclasses `BlockNode`, declares its
options and capabilities, and implements the `driver_*` hooks; callers —
parents in the graph and the `BlockBackend` — only ever use the public
generic methods (`preadv`, `pwritev`, `flush`, `pdiscard`, `pwrite_zeroes`).
The generic methods keep QEMU's semantics, which is the whole point:

* FUA the driver cannot do natively is emulated by a flush of this node after
  the write (`bdrv_driver_pwritev`'s emulate_flags).
* Every completed write, discard and write-zeroes bumps `write_gen`.
* `flush()` is serialized per node; a flush reads `write_gen` when it starts;
  `flush_to_os` always runs (even with cache.no-flush, i.e. unsafe),
  `flush_to_disk` runs unless the node was opened with no-flush or nothing
  was written since the last completed flush (`flushed_gen == write_gen`),
  then every child is flushed. A driver may instead take the whole flush
  (`driver_flush`), as QEMU's `bdrv_co_flush` callback does.
* Write-zeroes falls back to writing a zeroed buffer when the driver cannot
  do it (unless NO_FALLBACK was asked for).

Buffers are lists of writable/readable memoryviews (an iovec): the vhost
layer passes views straight into mapped guest memory, so nothing is copied
on the way down.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import BlockError, ReadOnlyError, UnsupportedError

IOVec = Sequence[memoryview]


class RequestFlags(enum.Flag):
    """Per-request flags, QEMU's BDRV_REQ_* that matter here."""

    NONE = 0
    FUA = enum.auto()  # the write must be stable when it completes
    MAY_UNMAP = enum.auto()  # write-zeroes may deallocate (discard) the range
    NO_FALLBACK = enum.auto()  # write-zeroes must not fall back to writing a buffer


@dataclass(frozen=True)
class OpenFlags:
    """How a node was opened; inherited by its children (like BDRV_O_* flags)."""

    read_only: bool = False
    direct: bool = False  # cache.direct: O_DIRECT on the host file
    no_flush: bool = False  # cache.no-flush: flushes never reach the disk (unsafe)


@dataclass(frozen=True)
class Option:
    """One option a driver accepts, as it would appear in `--blockdev`."""

    type: type  # str, int, bool, float; `size` options use int and accept k/M/G suffixes
    default: Any = None
    help: str = ""
    required: bool = False
    size: bool = False  # parse "64k", "1M", "2G"
    choices: tuple[str, ...] = ()


def iov_length(iov: IOVec) -> int:
    return sum(len(b) for b in iov)


class BlockNode:
    """Base of every driver. Subclasses set the ClassVars and implement hooks.

    `file` is the node's one child (formats and filters have one; protocol
    drivers like `file` and `null` have none).
    """

    driver: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    is_filter: ClassVar[bool] = False  # passes data through to `file` unchanged
    has_child: ClassVar[bool] = False  # requires a `file` child

    def __init__(
        self,
        node_name: str,
        opts: Mapping[str, Any],
        file: BlockNode | None,
        flags: OpenFlags,
    ) -> None:
        self.node_name = node_name
        self.opts = dict(opts)
        self.file = file
        self.open_flags = flags
        # What the driver can do natively; everything else is emulated here.
        self.supported_write_flags = RequestFlags.NONE
        self.supported_zero_flags = RequestFlags.NONE
        self.request_alignment = 1  # bytes; O_DIRECT files raise it
        self.can_discard = False
        self.can_write_zeroes = False
        self._gen_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time per node (active_flush_req)
        self.write_gen = 0
        self.flushed_gen = 0
        self.closed = False

    # -- what drivers implement ----------------------------------------------

    def driver_length(self) -> int:
        if self.file is None:
            raise NotImplementedError(f"driver {self.driver} must implement driver_length")
        return self.file.length

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        raise NotImplementedError

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        raise NotImplementedError

    def driver_flush_to_os(self) -> None:
        """Push this node's own caches to the OS. Default: none to push."""

    def driver_flush_to_disk(self) -> None:
        """Make what reached the OS stable. Default: nothing stable to make."""

    # Set to a method in a subclass to take the whole flush (bdrv_co_flush callback):
    # it is then responsible for flushing its children too.
    driver_flush: Any = None

    def driver_pdiscard(self, offset: int, length: int) -> None:
        raise UnsupportedError(f"node {self.node_name!r} ({self.driver}) cannot discard")

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        raise UnsupportedError(f"node {self.node_name!r} ({self.driver}) cannot write zeroes")

    def driver_close(self) -> None:
        """Release host resources (file descriptors, threads)."""

    def driver_write_cache_changed(self, enabled: bool) -> None:
        """The device's write cache was switched; nodes that record it (log-writes) override."""

    def describe(self) -> dict[str, Any]:
        """What `info` shows about this node; drivers add their own fields."""
        return {"node-name": self.node_name, "driver": self.driver, "length": self.length}

    # -- the generic layer: what parents and the BlockBackend call -------------

    @property
    def length(self) -> int:
        return self.driver_length()

    @property
    def children(self) -> list[BlockNode]:
        return [self.file] if self.file is not None else []

    def preadv(self, offset: int, iov: IOVec) -> None:
        self.driver_preadv(offset, iov)

    def pwritev(self, offset: int, iov: IOVec, flags: RequestFlags = RequestFlags.NONE) -> None:
        self._check_writable("write")
        if flags is RequestFlags.NONE:
            # The common case, without enum.Flag arithmetic (about 1 us per `&`).
            self.driver_pwritev(offset, iov, flags)
            self._write_done()
            return
        emulate_fua = (
            RequestFlags.FUA in flags and RequestFlags.FUA not in self.supported_write_flags
        )
        self.driver_pwritev(offset, iov, flags & self.supported_write_flags)
        self._write_done()
        if emulate_fua:
            self.flush()

    def pdiscard(self, offset: int, length: int) -> None:
        self._check_writable("discard")
        if not self.can_discard:
            # QEMU treats discard as advisory: a driver without it succeeds doing nothing.
            return
        self.driver_pdiscard(offset, length)
        self._write_done()

    def pwrite_zeroes(
        self, offset: int, length: int, flags: RequestFlags = RequestFlags.NONE
    ) -> None:
        self._check_writable("write-zeroes")
        if not self.can_write_zeroes:
            if RequestFlags.NO_FALLBACK in flags:
                raise UnsupportedError(
                    f"node {self.node_name!r} ({self.driver}) cannot write zeroes without a buffer"
                )
            self._write_zero_buffer(offset, length, flags & RequestFlags.FUA)
            return
        emulate_fua = (
            RequestFlags.FUA in flags and RequestFlags.FUA not in self.supported_zero_flags
        )
        self.driver_pwrite_zeroes(offset, length, flags & self.supported_zero_flags)
        self._write_done()
        if emulate_fua:
            self.flush()

    def _write_zero_buffer(self, offset: int, length: int, flags: RequestFlags) -> None:
        chunk = min(length, 1 << 20)
        zeroes = memoryview(bytearray(chunk))
        done = 0
        while done < length:
            n = min(chunk, length - done)
            self.pwritev(offset + done, [zeroes[:n]], flags)
            done += n

    def flush(self) -> None:
        if self.open_flags.read_only or self.closed:
            return
        with self._gen_lock:
            current_gen = self.write_gen
        with self._flush_lock:
            if self.driver_flush is not None:
                self.driver_flush()
            else:
                # Write back to the OS even with cache=unsafe ...
                self.driver_flush_to_os()
                # ... but only force it to the disk when allowed and when needed.
                if not self.open_flags.no_flush and self.flushed_gen != current_gen:
                    self.driver_flush_to_disk()
                first_error: BaseException | None = None
                for child in self.children:
                    try:
                        child.flush()
                    except (BlockError, OSError) as exc:  # flush every child; first error wins
                        first_error = first_error or exc
                if first_error is not None:
                    raise first_error
            self.flushed_gen = max(self.flushed_gen, current_gen)

    def write_cache_changed(self, enabled: bool) -> None:
        """Tell this node and everything below it the device's write-cache state."""
        self.driver_write_cache_changed(enabled)
        for child in self.children:
            child.write_cache_changed(enabled)

    def close(self) -> None:
        """Close this node and its children, once."""
        if self.closed:
            return
        self.closed = True
        try:
            self.driver_close()
        finally:
            for child in self.children:
                child.close()

    # -- helpers for drivers ---------------------------------------------------

    def _write_done(self) -> None:
        with self._gen_lock:
            self.write_gen += 1

    def _check_writable(self, what: str) -> None:
        if self.open_flags.read_only:
            raise ReadOnlyError(f"{what} refused: node {self.node_name!r} is read-only")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"
