"""Ring indices are shared with another process that writes them concurrently."""

from __future__ import annotations

import mmap
import os
import time

from harness.vhost.virtio import ring_u16


def test_ring_indices_are_never_torn() -> None:
    """Every value written is b*257 (equal bytes); a torn 16-bit read would mix two of them.

    struct's "<H" and even native "H" unpacking tore thousands of times a second
    here; the memoryview cast used for ring fields must not tear at all.
    """
    fd = os.memfd_create("ring-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED)
    ring = ring_u16(memoryview(m)[:8])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer child
        try:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for b in range(256):
                    ring[1] = b * 257
        finally:
            os._exit(0)
    torn = reads = 0
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            value = ring[1]
            reads += 1
            if value >> 8 != value & 0xFF:
                torn += 1
    finally:
        os.waitpid(pid, 0)
        ring.release()
        m.close()
        os.close(fd)
    assert reads > 10000
    assert torn == 0
