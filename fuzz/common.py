"""What both atheris targets share: a block device on a temp image, guest memory with
canaries around it, and the invariants checked after every input."""

from __future__ import annotations

import logging
import mmap
import os
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.block import open_backend
from harness.vhost.blk import BlkConfig, VirtioBlkDevice

IMAGE_SIZE = 1 << 20
PAGE = mmap.PAGESIZE
GUEST_BASE = 0x100000
USER_BASE = 0x7F0000000000
RSS_CHECK_EVERY = 2000
RSS_GROWTH_LIMIT_KIB = 256 << 10  # after warm-up: growth beyond this is a leak


class InvariantBroken(AssertionError):
    """A finding: the fuzzer reports the input that raised it."""


@dataclass
class ImageDevice:
    """A real BlockBackend on a temp image behind a VirtioBlkDevice."""

    path: Path
    device: VirtioBlkDevice

    @classmethod
    def create(cls, num_queues: int = 2) -> ImageDevice:
        directory = Path(tempfile.mkdtemp(prefix="powercut-fuzz-"))
        path = directory / "disk.img"
        with open(path, "wb") as f:
            f.truncate(IMAGE_SIZE)
        backend = open_backend(str(path), cache="writeback")
        return cls(path, VirtioBlkDevice(backend, BlkConfig(num_queues=num_queues, serial="fuzz")))

    def check_size(self) -> None:
        size = self.path.stat().st_size
        if size != IMAGE_SIZE:
            raise InvariantBroken(f"the image grew or shrank: {size} != {IMAGE_SIZE} bytes")


class GuardedMemfd:
    """A memfd whose middle `size` bytes are guest memory; a canary page on each side.

    The backend is given only the middle (mmap offset PAGE), so any byte it
    writes outside the region lands on a canary, and `check()` finds it.
    """

    def __init__(self, size: int, name: str = "fuzz-guest") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size + 2 * PAGE)
        self.map = mmap.mmap(self.fd, size + 2 * PAGE, flags=mmap.MAP_SHARED)
        self.canary = (bytes(range(256)) * (PAGE // 256 + 1))[:PAGE]
        self.restore()

    @property
    def offset(self) -> int:
        return PAGE

    def region(self) -> memoryview:
        return memoryview(self.map)[PAGE : PAGE + self.size]

    def restore(self) -> None:
        """Rewrite the canaries (after an input that legitimately mapped them)."""
        self.map[:PAGE] = self.canary
        self.map[PAGE + self.size :] = self.canary

    def check(self) -> None:
        if self.map[:PAGE] != self.canary or self.map[PAGE + self.size :] != self.canary:
            raise InvariantBroken("the backend wrote outside the memory region it was given")


class RssWatch:
    """Memory must not grow without bound: RSS after warm-up stays within a limit."""

    def __init__(self) -> None:
        self.iterations = 0
        self.baseline: int | None = None

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations % RSS_CHECK_EVERY:
            return
        rss = _rss_kib()
        if self.baseline is None:
            self.baseline = rss
        elif rss - self.baseline > RSS_GROWTH_LIMIT_KIB:
            raise InvariantBroken(
                f"RSS grew from {self.baseline} to {rss} KiB over {self.iterations} inputs"
            )


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class InternalErrors(logging.Handler):
    """Collects `log.exception` records from the backend: a queue thread that catches
    an unexpected exception turns it into NEEDS_RESET, which hides the bug from the
    fuzzer unless someone looks. Also keeps the backend's per-input logging quiet."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    @classmethod
    def install(cls) -> InternalErrors:
        handler = cls()
        root = logging.getLogger("harness")
        root.addHandler(handler)
        root.propagate = False
        root.setLevel(logging.ERROR)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.found.append(self.format(record))

    def check(self) -> None:
        if self.found:
            found, self.found = self.found, []
            raise InvariantBroken("internal error inside the backend:\n" + "\n".join(found))
