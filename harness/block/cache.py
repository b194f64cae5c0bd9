"""Cache modes, parsed exactly as QEMU's `bdrv_parse_cache_mode` does.

A cache mode is only shorthand for three independent settings: whether the
device advertises a volatile write cache (`write-cache`, i.e. the inverse of
QEMU's `writethrough`), whether the host file is opened with O_DIRECT
(`cache.direct`) and whether flushes may reach the disk (`cache.no-flush`).
Explicit options always win over the shorthand, as with QEMU's `-drive`.
The mode names themselves belong to the durability contract
(`harness.durability.contract`), which says what each mode promises.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.durability.contract import VALID_MODES, CacheMode, parse_cache_mode

__all__ = ["VALID_MODES", "CacheMode", "CacheSettings", "cache_settings", "parse_cache_mode"]


@dataclass(frozen=True)
class CacheSettings:
    write_cache: bool  # the device has a volatile write cache: writes complete without FUA
    direct: bool  # cache.direct: O_DIRECT on the host file
    no_flush: bool  # cache.no-flush: flushes stop at the OS (unsafe)


_SETTINGS = {
    CacheMode.WRITEBACK: CacheSettings(write_cache=True, direct=False, no_flush=False),
    CacheMode.NONE: CacheSettings(write_cache=True, direct=True, no_flush=False),
    CacheMode.WRITETHROUGH: CacheSettings(write_cache=False, direct=False, no_flush=False),
    CacheMode.DIRECTSYNC: CacheSettings(write_cache=False, direct=True, no_flush=False),
    CacheMode.UNSAFE: CacheSettings(write_cache=True, direct=False, no_flush=True),
}


def cache_settings(mode: CacheMode) -> CacheSettings:
    return _SETTINGS[mode]
