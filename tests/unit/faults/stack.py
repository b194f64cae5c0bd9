"""Build fault-model stacks for the tests through the real block stack.

The graph is the recommended one: log-writes (what the guest was told) over
[blkdebug over] powerfail (what the host may lose) over the `file` driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.block import BlockBackend, open_backend


@dataclass(frozen=True)
class Paths:
    image: Path
    journal: Path
    log: Path


def make_paths(tmp: Path, size: int = 1 << 20, fill: int | None = None) -> Paths:
    image = tmp / "d.img"
    with open(image, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(bytes([fill]) * size)
    return Paths(image, tmp / "d.img.journal", tmp / "w.log")


def stack_options(
    paths: Paths,
    *,
    blkdebug: str | None = None,
    log_data: bool = False,
    powerfail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    leaf: dict[str, Any] = {
        "driver": "powerfail",
        "node-name": "pf",
        "journal": str(paths.journal),
        **(powerfail or {}),
        "file": {"driver": "file", "node-name": "img", "filename": str(paths.image)},
    }
    if blkdebug is not None:
        leaf = {"driver": "blkdebug", "node-name": "dbg", "rules": blkdebug, "file": leaf}
    return {
        "driver": "log-writes",
        "node-name": "lw",
        "log": str(paths.log),
        "log-data": log_data,
        "file": leaf,
    }


def open_stack(paths: Paths, mode: str = "writeback", **kwargs: Any) -> BlockBackend:
    return open_backend(stack_options(paths, **kwargs), cache=mode)
