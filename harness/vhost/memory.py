"""The guest memory table: the frontend's shared regions, mapped into this process.

A region arrives as an fd (memfd, `share=on`) plus the guest physical
address, the frontend's virtual address and the offset into the fd
(vhost-user.rst "Memory region description"). Descriptor addresses are guest
physical; the ring addresses of SET_VRING_ADDR are frontend virtual, so both
lookups are here. Every lookup checks the whole range against one region:
nothing outside the regions is ever touched.

The table is replaced, never mutated, so queue threads read it without a
lock. A removed region's mapping stays alive while a request still holds a
view into it and is unmapped when the last view goes (mmap keeps itself open
while buffers are exported).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass

from harness.errors import GuestError, ProtocolError

log = logging.getLogger(__name__)

# The most regions a frontend may add with ADD_MEM_REG (GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32


def check_fd_covers(fd: int, offset: int, size: int, what: str) -> None:
    """Refuse a mapping that reaches past the end of its file: touching it would SIGBUS."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(f"{what}: bad file descriptor: {exc}") from exc
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise ProtocolError(
            f"{what}: {size} bytes at offset {offset} reach past the end of the "
            f"{st.st_size}-byte file behind it"
        )


@dataclass(frozen=True)
class RegionDesc:
    """A region as the frontend describes it (VhostUserMemoryRegion)."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


class MappedRegion:
    """One region mapped shared into this process."""

    def __init__(self, desc: RegionDesc, fd: int) -> None:
        if desc.size <= 0:
            raise ProtocolError(f"memory region at guest 0x{desc.guest_addr:x} has size 0")
        self.desc = desc
        check_fd_covers(
            fd, desc.mmap_offset, desc.size, f"memory region at guest 0x{desc.guest_addr:x}"
        )
        # mmap offsets must be page aligned; map from the page below and skip the rest.
        page = mmap.ALLOCATIONGRANULARITY
        aligned = desc.mmap_offset - desc.mmap_offset % page
        self._skip = desc.mmap_offset - aligned
        try:
            self._map = mmap.mmap(
                fd,
                desc.size + self._skip,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(
                f"cannot map memory region guest 0x{desc.guest_addr:x}+0x{desc.size:x} "
                f"(fd offset 0x{desc.mmap_offset:x}): {exc}; the guest memory must be a "
                "shared file mapping (memory-backend-memfd,share=on)"
            ) from exc
        self.view = memoryview(self._map)[self._skip : self._skip + desc.size]
        self.guest_addr = desc.guest_addr
        self.size = desc.size
        self.gpa_end = desc.guest_addr + desc.size
        self.uva_end = desc.user_addr + desc.size

    def close(self) -> None:
        self.view.release()
        # Fails while a request still holds a view; then the mmap is unmapped when it goes.
        with contextlib.suppress(BufferError):
            self._map.close()


class GuestMemory:
    """The current set of mapped regions (immutable snapshots, swapped under a lock)."""

    def __init__(self) -> None:
        self._regions: tuple[MappedRegion, ...] = ()
        self._lock = threading.Lock()

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return self._regions

    def set_table(self, regions: list[tuple[RegionDesc, int]]) -> None:
        """Replace the whole table (SET_MEM_TABLE). Takes ownership of the fds."""
        mapped: list[MappedRegion] = []
        try:
            for desc, fd in regions:
                mapped.append(MappedRegion(desc, fd))
        finally:
            for _, fd in regions:
                os.close(fd)
        self._check_overlaps(mapped)
        with self._lock:
            old, self._regions = self._regions, tuple(mapped)
        for region in old:
            region.close()

    def add(self, desc: RegionDesc, fd: int) -> None:
        """Map one more region (ADD_MEM_REG). Takes ownership of the fd."""
        try:
            region = MappedRegion(desc, fd)
        finally:
            os.close(fd)
        with self._lock:
            if len(self._regions) >= MAX_MEM_SLOTS:
                region.close()
                raise ProtocolError(f"more than {MAX_MEM_SLOTS} memory regions added")
            candidate = (*self._regions, region)
            try:
                self._check_overlaps(list(candidate))
            except ProtocolError:
                region.close()
                raise
            self._regions = candidate

    def remove(self, desc: RegionDesc) -> None:
        """Unmap the region matching guest address, size and user address (REM_MEM_REG)."""
        with self._lock:
            keep = []
            gone = []
            for region in self._regions:
                d = region.desc
                if (d.guest_addr, d.size, d.user_addr) == (
                    desc.guest_addr,
                    desc.size,
                    desc.user_addr,
                ):
                    gone.append(region)
                else:
                    keep.append(region)
            if not gone:
                raise ProtocolError(
                    f"REM_MEM_REG for guest 0x{desc.guest_addr:x}+0x{desc.size:x}: no such region"
                )
            self._regions = tuple(keep)
        for region in gone:
            region.close()

    def clear(self) -> None:
        with self._lock:
            old, self._regions = self._regions, ()
        for region in old:
            region.close()

    @staticmethod
    def _check_overlaps(regions: list[MappedRegion]) -> None:
        spans = sorted((r.desc.guest_addr, r.gpa_end) for r in regions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ProtocolError("memory regions overlap in guest physical address space")

    # -- lookups --------------------------------------------------------------

    def gpa(self, addr: int, length: int) -> list[memoryview]:
        """Views covering guest-physical [addr, addr+length); may span adjacent regions."""
        for region in self._regions:  # the common case: inside one region
            off = addr - region.guest_addr
            if off >= 0 and off + length <= region.size:
                return [region.view[off : off + length]]
        return self._gpa_spanning(addr, length)

    def _gpa_spanning(self, addr: int, length: int) -> list[memoryview]:
        views: list[memoryview] = []
        regions = self._regions
        while length > 0:
            for region in regions:
                start = region.desc.guest_addr
                if start <= addr < region.gpa_end:
                    off = addr - start
                    n = min(length, region.gpa_end - addr)
                    views.append(region.view[off : off + n])
                    addr += n
                    length -= n
                    break
            else:
                raise GuestError(f"guest address 0x{addr:x} (+{length}) is outside guest memory")
        return views

    def gpa_contiguous(self, addr: int, length: int) -> memoryview:
        """One view of [addr, addr+length) that must lie within a single region."""
        for region in self._regions:
            start = region.desc.guest_addr
            if start <= addr and addr + length <= region.gpa_end:
                off = addr - start
                return region.view[off : off + length]
        raise GuestError(f"guest range 0x{addr:x}+{length} is not inside one memory region")

    def uva_contiguous(self, addr: int, length: int) -> memoryview:
        """A view of frontend-virtual [addr, addr+length) inside a single region."""
        for region in self._regions:
            start = region.desc.user_addr
            if start <= addr and addr + length <= region.uva_end:
                off = addr - start
                return region.view[off : off + length]
        raise GuestError(f"frontend address 0x{addr:x}+{length} is not inside one memory region")
