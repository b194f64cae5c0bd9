"""Cache modes, parsed exactly as QEMU's `bdrv_parse_cache_mode` does.

A cache mode is only shorthand for three independent settings: whether the
device advertises a volatile write cache (`write-cache`, i.e. the inverse of
QEMU's `writethrough`), whether the host file is opened with O_DIRECT
(`cache.direct`) and whether flushes may reach the disk (`cache.no-flush`).
Explicit options always win over the shorthand, as with QEMU's `-drive`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.errors import ConfigError


class CacheMode(enum.Enum):
    WRITEBACK = "writeback"
    NONE = "none"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


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

VALID_MODES = "writeback, none (or off), writethrough, directsync, unsafe"


def parse_cache_mode(mode: str | CacheMode) -> CacheMode:
    """The `CacheMode` named by `mode`; "off" is QEMU's alias of "none"."""
    if isinstance(mode, CacheMode):
        return mode
    if mode == "off":
        return CacheMode.NONE
    try:
        return CacheMode(mode)
    except ValueError:
        raise ConfigError(f"invalid cache mode {mode!r}; valid modes: {VALID_MODES}") from None


def cache_settings(mode: str | CacheMode) -> CacheSettings:
    return _SETTINGS[parse_cache_mode(mode)]
