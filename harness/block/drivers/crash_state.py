"""`crash-state`: a crash state as a disk — the base image plus a delta, writes thrown away.

For the long-lived checker guest of crash-state exploration: the guest mounts
the disk (replaying the filesystem's journal), runs the workload's check,
unmounts, and the node moves to the next state without the guest rebooting.

Reads see three layers, top first: the *throwaway layer* (what the guest
wrote since the last switch, kept in memory), the state's *delta* (the
sectors where the state differs from the base: `harness.durability.delta`),
and the `file` child (the base image, never written). Writes, write-zeroes
and discards go to the throwaway layer only; a flush has nothing to make
durable. `switch(delta)` — the control socket's `state-switch` command —
swaps in the next state's delta and discards the throwaway layer at once, so
nothing a mount wrote into one state leaks into the next. (The guest must
have unmounted and dropped its caches first: stale pages in the guest are
the guest's to discard, which no backend can do for it.)

Options: `delta` (path of the first state's delta; none: the base as it is).

    driver=crash-state,delta=/x/p3-lose-all-0.delta,file.driver=file,file.filename=/x/base.img
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags
from harness.block.registry import register_driver
from harness.durability.delta import Delta, read_delta
from harness.errors import ConfigError

SECTOR = 512


@register_driver
class CrashStateNode(BlockNode):
    driver: ClassVar[str] = "crash-state"
    has_child: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = {
        "delta": Option(str, None, help="the state's delta file (default: the base as it is)"),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        if file is None:
            raise ConfigError(f"crash-state node {node_name!r} needs a file child (the base)")
        self.base: BlockNode = file
        self.supported_write_flags = RequestFlags.FUA  # nothing is durable: FUA costs nothing
        self.supported_zero_flags = RequestFlags.FUA | RequestFlags.MAY_UNMAP
        self.can_discard = True
        self.can_write_zeroes = True
        self._lock = threading.Lock()
        self._layer: dict[int, bytearray] = {}  # sector -> what the guest wrote there
        self.delta_path: str | None = None
        self.delta: Delta | None = None
        self.switches = 0
        delta = opts.get("delta")
        self._load_initial(str(delta) if delta else None)

    def _load(self, path: str | None) -> Delta | None:
        if path is None:
            return None
        delta = read_delta(path)
        if delta.image_size != self.base.length:
            raise ConfigError(
                f"state delta {path} is for an image of {delta.image_size} bytes; the base of "
                f"node {self.node_name!r} has {self.base.length}; serve the recording's base"
            )
        return delta

    def _load_initial(self, path: str | None) -> None:
        self.delta = self._load(path)
        self.delta_path = path

    def switch(self, delta: str | Path | None) -> dict[str, Any]:
        """Present another state: its delta over the base, and nothing the guest wrote."""
        path = str(delta) if delta else None
        new = self._load(path)  # a bad file leaves the current state as it was
        with self._lock:
            discarded = len(self._layer)
            self._layer = {}
            self.delta, self.delta_path = new, path
            self.switches += 1
        return {
            "delta": path,
            "sectors": new.sectors if new is not None else 0,
            "discarded_sectors": discarded,
            "switches": self.switches,
        }

    # -- requests ----------------------------------------------------------------

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        with self._lock:
            pos = offset
            for view in iov:
                n = len(view)
                self.base.preadv(pos, [view])
                if self.delta is not None:
                    self.delta.patch(pos, view)
                if self._layer:
                    self._patch_layer(pos, view)
                pos += n

    def _patch_layer(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        layer = self._layer
        for s in range(offset // SECTOR, -(-end // SECTOR)):
            data = layer.get(s)
            if data is None:
                continue
            lo = s * SECTOR
            a, b = max(lo, offset), min(lo + SECTOR, end)
            view[a - offset : b - offset] = data[a - lo : b - lo]

    def _sector(self, s: int) -> bytearray:
        """The current content of sector `s` (caller holds the lock)."""
        data = self._layer.get(s)
        if data is None:
            data = bytearray(SECTOR)
            view = memoryview(data)
            self.base.preadv(s * SECTOR, [view])
            if self.delta is not None:
                self.delta.patch(s * SECTOR, view)
        return data

    def _store(self, offset: int, buf: bytes | memoryview) -> None:
        end = offset + len(buf)
        with self._lock:
            for s in range(offset // SECTOR, -(-end // SECTOR)):
                lo = s * SECTOR
                a, b = max(lo, offset), min(lo + SECTOR, end)
                if a == lo and b == lo + SECTOR:
                    self._layer[s] = bytearray(buf[a - offset : b - offset])
                else:
                    data = self._sector(s)
                    data[a - lo : b - lo] = buf[a - offset : b - offset]
                    self._layer[s] = data

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        self._store(offset, iov[0] if len(iov) == 1 else b"".join(iov))

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._store(offset, bytes(length))

    def driver_pdiscard(self, offset: int, length: int) -> None:
        self._store(offset, bytes(length))

    def _no_flush(self) -> None:
        """Nothing here is durable, and the base is never written."""

    driver_flush = _no_flush

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        with self._lock:
            info.update(
                {
                    "delta": self.delta_path,
                    "delta-sectors": self.delta.sectors if self.delta is not None else 0,
                    "written-sectors": len(self._layer),
                    "switches": self.switches,
                }
            )
        return info
