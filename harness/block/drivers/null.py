"""The `null` protocol driver: reads zeroes, drops writes, never touches the host.

It is the floor for benchmarks: whatever a request costs through a stack that
ends in `null` is the cost of the stack itself. (QEMU's null-co reads garbage
unless `read-zeroes=on`; here zeroes are the default so tests can rely on them.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import register_driver

_ZEROES = bytes(1 << 20)


@register_driver
class NullNode(BlockNode):
    driver = "null"
    options = {
        "size": Option(int, default=1 << 30, size=True, help="device length (default 1G)"),
        "read-zeroes": Option(bool, default=True, help="fill read buffers with zeroes"),
        "latency-ns": Option(int, default=0, help="delay every request by this long"),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        self._size = int(opts.get("size", 1 << 30))
        self.read_zeroes = bool(opts.get("read-zeroes", True))
        self.latency = int(opts.get("latency-ns", 0)) / 1e9
        self.supported_write_flags = RequestFlags.FUA
        self.supported_zero_flags = RequestFlags.FUA | RequestFlags.MAY_UNMAP
        self.can_discard = True
        self.can_write_zeroes = True

    def driver_length(self) -> int:
        return self._size

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        if self.latency:
            time.sleep(self.latency)
        if self.read_zeroes:
            for view in iov:
                n = len(view)
                view[:] = _ZEROES[:n] if n <= len(_ZEROES) else bytes(n)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        if self.latency:
            time.sleep(self.latency)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        pass

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        pass
