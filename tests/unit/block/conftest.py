"""Fixtures for the block stack tests: images, and a failing node to exercise error policies."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import driver_names, register_driver

IMAGE_SIZE = 16 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB sparse raw image."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


class FailingNode(BlockNode):
    """A filter that fails the first `count` requests of kind `op` with `errno`.

    A test-only stand-in for blkdebug's rules: the error comes back through the
    real generic layer and BlockBackend, exactly as a host error would.
    """

    driver = "test-fail"
    has_child = True
    is_filter = True
    options = {
        "op": Option(str, default="write", choices=("read", "write", "flush", "discard", "zeroes")),
        "errno": Option(int, default=errno.EIO),
        "count": Option(int, default=1),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        assert file is not None
        self.op = opts["op"]
        self.err = opts["errno"]
        self.remaining = opts["count"]
        self.can_discard = True
        self.can_write_zeroes = True
        self.driver_flush = self._flush

    def _maybe_fail(self, op: str) -> None:
        if op == self.op and self.remaining > 0:
            self.remaining -= 1
            raise OSError(self.err, f"injected {errno.errorcode[self.err]}")

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        assert self.file is not None
        self._maybe_fail("read")
        self.file.preadv(offset, iov)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        assert self.file is not None
        self._maybe_fail("write")
        self.file.pwritev(offset, iov, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        assert self.file is not None
        self._maybe_fail("discard")
        self.file.pdiscard(offset, length)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        assert self.file is not None
        self._maybe_fail("zeroes")
        self.file.pwrite_zeroes(offset, length, flags)

    def _flush(self) -> None:
        assert self.file is not None
        self._maybe_fail("flush")
        self.file.flush()


@pytest.fixture(scope="session", autouse=True)
def _test_drivers() -> Iterator[None]:
    if "test-fail" not in driver_names():
        register_driver(FailingNode)
    yield
