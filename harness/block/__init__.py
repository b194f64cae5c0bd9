"""The block stack: QEMU's block-layer semantics, in Python.

`open_backend()` builds a node graph from `--blockdev` options and returns the
`BlockBackend` every layer above (the vhost-user-blk device, `powercut io`,
tests) talks to. See docs/architecture.md.
"""

from harness.block.backend import (
    BackendStats,
    BlockBackend,
    ErrorAction,
    OpStats,
    open_backend,
    open_blockdevs,
)
from harness.block.cache import CacheMode, CacheSettings, cache_settings, parse_cache_mode
from harness.block.node import BlockNode, OpenFlags, RequestFlags

__all__ = [
    "BackendStats",
    "BlockBackend",
    "BlockNode",
    "CacheMode",
    "CacheSettings",
    "ErrorAction",
    "OpStats",
    "OpenFlags",
    "RequestFlags",
    "cache_settings",
    "open_backend",
    "open_blockdevs",
    "parse_cache_mode",
]
