"""The `raw` format driver: the image is the data, optionally a window of it.

`offset` and `size` expose part of the child, as QEMU's raw format does, so
one file can hold several disks or a partition can be served alone. FUA and
the write-zeroes flags pass through only where the child can honour them;
otherwise the generic layer emulates them on this node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import register_driver
from harness.errors import ConfigError

_SECTOR = 512


@register_driver
class RawNode(BlockNode):
    driver = "raw"
    has_child = True
    options = {
        "offset": Option(int, default=0, size=True, help="where the window starts in the child"),
        "size": Option(int, size=True, help="window length (default: to the end of the child)"),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        assert file is not None
        child_len = file.length
        self.offset = int(opts.get("offset") or 0)
        size = opts.get("size")
        if self.offset > child_len:
            raise ConfigError(
                f"raw node {node_name!r}: offset {self.offset} is beyond the end of its file "
                f"({child_len} bytes)"
            )
        if size is not None:
            if size % _SECTOR:
                raise ConfigError(f"raw node {node_name!r}: size {size} is not a multiple of 512")
            if self.offset + size > child_len:
                raise ConfigError(
                    f"raw node {node_name!r}: offset {self.offset} + size {size} is beyond the "
                    f"end of its file ({child_len} bytes)"
                )
        self._size = int(size) if size is not None else None
        self.supported_write_flags = file.supported_write_flags & RequestFlags.FUA
        self.supported_zero_flags = file.supported_zero_flags & (
            RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
        )
        self.request_alignment = file.request_alignment
        self.can_discard = True
        self.can_write_zeroes = True
        # Hot path: skip the offset arithmetic when there is no window.
        if self.offset == 0:
            self.driver_preadv = file.preadv  # type: ignore[method-assign]

    def driver_length(self) -> int:
        if self._size is not None:
            return self._size
        assert self.file is not None
        return self.file.length - self.offset

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        assert self.file is not None
        self.file.preadv(offset + self.offset, iov)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        assert self.file is not None
        self.file.pwritev(offset + self.offset, iov, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        assert self.file is not None
        self.file.pdiscard(offset + self.offset, length)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        assert self.file is not None
        self.file.pwrite_zeroes(offset + self.offset, length, flags)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"offset": self.offset, "size": self.length})
        return info
