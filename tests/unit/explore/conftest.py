"""Record runs through the real fault stack (log-writes with data over [blkdebug over] powerfail).

`Recorder` drives the `BlockBackend` in-process the way a guest would, marks
acknowledgements in the log, and can snapshot the image and its powerfail
journal at any moment, so a test can compare an offline cut of the snapshot
(what the runner does) with the explored state at the same point.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.block import BlockBackend, open_backend
from harness.block.drivers.log_writes import LogWritesNode
from harness.durability.contract import CacheMode
from harness.explore.recording import (
    Recording,
    acks_from_marks,
    snapshot_base,
    write_recording,
)


@dataclass
class Snapshot:
    image: Path
    journal: Path
    records: int  # log records written when it was taken


class Recorder:
    def __init__(
        self,
        tmp: Path,
        *,
        size: int = 1 << 20,
        mode: str = "writeback",
        fill: int | None = 0x5A,
        blkdebug: str | None = None,
        log_data: bool = True,
        base: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.root = tmp / "rec"
        self.image = tmp / "d.img"
        self.journal = tmp / "d.img.journal"
        self.mode = mode
        if base is not None:
            shutil.copyfile(base, self.image)
        else:
            with open(self.image, "wb") as f:
                if fill is None:
                    f.truncate(size)
                else:
                    f.write(bytes([fill]) * size)
        snapshot_base(self.image, self.root)
        leaf: dict[str, Any] = {
            "driver": "powerfail",
            "node-name": "pf",
            "journal": str(self.journal),
            "file": {"driver": "file", "node-name": "img", "filename": str(self.image)},
        }
        if blkdebug is not None:
            leaf = {"driver": "blkdebug", "node-name": "dbg", "rules": blkdebug, "file": leaf}
        self.backend: BlockBackend = open_backend(
            {
                "driver": "log-writes",
                "node-name": "lw",
                "log": str(self.root / "write.log"),
                "log-data": log_data,
                "file": leaf,
            },
            cache=mode,
        )
        self.snapshots: list[Snapshot] = []

    @property
    def lw(self) -> LogWritesNode:
        node = self.backend.node("lw")
        assert isinstance(node, LogWritesNode)
        return node

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.backend.write(offset, data, fua=fua)

    def flush(self) -> None:
        self.backend.flush()

    def ack(self, token: str) -> None:
        self.lw.mark(f"ack {token}")

    def records(self) -> int:
        from harness.durability.writelog import read_log

        return read_log(self.root / "write.log").records

    def snapshot(self) -> Snapshot:
        n = len(self.snapshots)
        snap = Snapshot(self.tmp / f"snap{n}.img", self.tmp / f"snap{n}.journal", self.records())
        shutil.copyfile(self.image, snap.image)
        shutil.copyfile(self.journal, snap.journal)
        self.snapshots.append(snap)
        return snap

    def finish(self, **extra: Any) -> Recording:
        """Power off without the backend's final flush, then describe the recording."""
        if not self.backend.root.closed:
            self.backend.graph.close()
        from harness.durability.writelog import read_log

        wlog = read_log(self.root / "write.log")
        return write_recording(
            self.root, mode=CacheMode(self.mode), acks=acks_from_marks(wlog), extra=extra
        )

    def close(self) -> None:
        if not self.backend.root.closed:
            self.backend.graph.close()


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Any]:
    made: list[Recorder] = []

    def make(**kwargs: Any) -> Recorder:
        r = Recorder(tmp_path / f"r{len(made)}", **kwargs)
        made.append(r)
        return r

    (tmp_path / "r0").mkdir()
    for i in range(1, 8):
        (tmp_path / f"r{i}").mkdir()
    yield make
    for r in made:
        r.close()


def pattern(seed: int, length: int = 4096) -> bytes:
    """Data distinct per seed and per sector."""
    return random.Random(seed).randbytes(length)
