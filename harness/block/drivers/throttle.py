"""The `throttle` filter driver: requests wait for their throttle group's limits.

As QEMU's `throttle` filter, it names a group (`throttle-group=ID`) that
several filters, and backends with `throttling.*` options, may share. Given
`throttling.*` options too, it creates or reconfigures that group (an
extension: QEMU needs `-object throttle-group` for that). Reads, writes,
write-zeroes and discards are throttled; flushes are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import register_driver
from harness.block.throttle import LIMIT_KEYS, ThrottleLimits, join_group, leave_group
from harness.errors import ConfigError


@register_driver
class ThrottleNode(BlockNode):
    driver = "throttle"
    has_child = True
    is_filter = True
    options = {
        "throttle-group": Option(str, help="the throttle group this filter belongs to"),
        **{f"throttling.{k}": Option(str, help="QEMU throttling limit") for k in LIMIT_KEYS},
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        assert file is not None
        limit_opts = {k: v for k, v in opts.items() if k.startswith("throttling.")}
        limits = ThrottleLimits.parse(limit_opts) if limit_opts else None
        group_name = opts.get("throttle-group")
        if group_name is None:
            if limits is None:
                raise ConfigError(
                    f"throttle node {node_name!r} needs throttle-group=ID (or throttling.* limits)"
                )
            group_name = f"#throttle-{node_name}"
        self.group = join_group(str(group_name), self, limits)
        self.supported_write_flags = file.supported_write_flags
        self.supported_zero_flags = file.supported_zero_flags
        self.request_alignment = file.request_alignment
        self.can_discard = True
        self.can_write_zeroes = True

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        assert self.file is not None
        self.group.intercept(self, False, sum(len(v) for v in iov))
        self.file.preadv(offset, iov)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        assert self.file is not None
        self.group.intercept(self, True, sum(len(v) for v in iov))
        self.file.pwritev(offset, iov, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        assert self.file is not None
        self.group.intercept(self, True, length)
        self.file.pdiscard(offset, length)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        assert self.file is not None
        self.group.intercept(self, True, length)
        self.file.pwrite_zeroes(offset, length, flags)

    def driver_close(self) -> None:
        leave_group(self.group, self)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"throttle-group": self.group.name, "limits": self.group.limits.to_dict()})
        return info
