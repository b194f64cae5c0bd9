from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.block import BlockBackend

from .stack import Paths, make_paths, open_stack


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return make_paths(tmp_path, 256 * 1024, fill=0x5A)


@pytest.fixture
def backend(paths: Paths) -> Iterator[BlockBackend]:
    be = open_stack(paths, "writeback")
    try:
        yield be
    finally:
        crash(be)


def crash(be: BlockBackend) -> None:
    """Close the graph without the backend's final flush: what a power cut leaves."""
    if not be.root.closed:
        be.graph.close()
