"""atheris target: virtqueue processing from arbitrary descriptor tables and avail rings.

Each input lays out a split ring (descriptor table, avail ring, data area with
indirect tables and request headers) in a guest memory region shared with the
device, and runs the queue worker's processing loop (`QueueWorker._process`)
over a real block backend on a temp image. Invariants: nothing but BrokenRing /
NoStatusByte (→ NEEDS_RESET) leaves the loop; every popped request is pushed
exactly once (or the device goes to NEEDS_RESET); used lengths fit the writable
buffers; nothing outside the region or the image is touched; memory stays flat.

    python fuzz/virtqueue.py fuzz/corpus/virtqueue -max_total_time=120
"""

from __future__ import annotations

import collections
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["harness"]):
    import harness.block  # noqa: F401  (instrumented too: the requests reach it)
    from harness.vhost.blk import NoStatusByte
    from harness.vhost.memory import GuestMemory, RegionDesc
    from harness.vhost.server import QueueWorker
    from harness.vhost.virtqueue import BrokenRing, DescChain, SplitVirtqueue, VringAddr

from common import (
    GUEST_BASE,
    USER_BASE,
    GuardedMemfd,
    ImageDevice,
    InternalErrors,
    InvariantBroken,
    RssWatch,
)

REGION_SIZE = 64 << 10
DESC_OFF, AVAIL_OFF, USED_OFF, DATA_OFF = 0x0000, 0x1000, 0x2000, 0x3000
DESC = struct.Struct("<QIHH")


class Target:
    def __init__(self) -> None:
        self.image = ImageDevice.create(num_queues=1)
        self.guest = GuardedMemfd(REGION_SIZE)
        self.memory = GuestMemory()
        desc = RegionDesc(GUEST_BASE, REGION_SIZE, USER_BASE, self.guest.offset)
        self.memory.set_table([(desc, os.dup(self.guest.fd))])  # takes the dup
        server = SimpleNamespace(device=self.image.device, parallel_min=0)
        self.session: Any = SimpleNamespace(
            server=server, memory=self.memory, needs_reset=lambda vq, cause: None
        )
        self.rss = RssWatch()
        self.internal = InternalErrors.install()
        self.region = self.guest.region()

    def address(self, fdp: atheris.FuzzedDataProvider) -> int:
        kind = fdp.ConsumeIntInRange(0, 7)
        if kind == 0:
            return fdp.ConsumeIntInRange(0, (1 << 64) - 1)  # anywhere
        if kind == 1:  # around the region's ends
            return GUEST_BASE + REGION_SIZE + fdp.ConsumeIntInRange(-64, 64)
        if kind == 2:
            return GUEST_BASE + fdp.ConsumeIntInRange(-64, 64)
        return GUEST_BASE + DATA_OFF + fdp.ConsumeIntInRange(0, REGION_SIZE - DATA_OFF)

    def length(self, fdp: atheris.FuzzedDataProvider) -> int:
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            return fdp.ConsumeIntInRange(0, (1 << 32) - 1)
        return fdp.ConsumeIntInRange(0, 0x1100)

    def run(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        num = 1 << fdp.ConsumeIntInRange(0, 5)
        event_idx = fdp.ConsumeBool()
        indirect = fdp.ConsumeBool()
        region = self.region
        region[:] = bytes(REGION_SIZE)
        for i in range(num):
            flags = fdp.ConsumeIntInRange(0, 7)
            if fdp.ConsumeIntInRange(0, 15) == 0:
                flags |= fdp.ConsumeIntInRange(0, 0xFFFF)
            nxt = fdp.ConsumeIntInRange(0, num + 2)
            DESC.pack_into(
                region, DESC_OFF + 16 * i, self.address(fdp), self.length(fdp), flags, nxt
            )
        pending = fdp.ConsumeIntInRange(0, num + 1)
        start = fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool() else 0
        struct.pack_into(
            "<HH", region, AVAIL_OFF, fdp.ConsumeIntInRange(0, 1), (start + pending) & 0xFFFF
        )
        for i in range(num):
            struct.pack_into("<H", region, AVAIL_OFF + 4 + 2 * i, fdp.ConsumeIntInRange(0, num + 1))
        struct.pack_into("<H", region, USED_OFF + 2, start)
        rest = fdp.ConsumeBytes(REGION_SIZE - DATA_OFF)
        region[DATA_OFF : DATA_OFF + len(rest)] = rest

        vq = SplitVirtqueue(0)
        vq.num = num
        vq.addr = VringAddr(0, USER_BASE + DESC_OFF, USER_BASE + USED_OFF, USER_BASE + AVAIL_OFF, 0)
        vq.map(self.memory)
        vq.event_idx, vq.indirect = event_idx, indirect
        vq.last_avail_idx = vq.used_idx = start
        popped: list[DescChain] = []
        pushed: list[tuple[int, int]] = []
        pop: Callable[..., DescChain | None] = vq.pop
        push: Callable[[int, int], None] = vq.push

        def counting_pop(memory: GuestMemory) -> DescChain | None:
            chain = pop(memory)
            if chain is not None:
                popped.append(chain)
            return chain

        def counting_push(head: int, length: int) -> None:
            pushed.append((head, length))
            push(head, length)

        vq.pop = counting_pop  # type: ignore[method-assign]
        vq.push = counting_push  # type: ignore[method-assign]
        worker = QueueWorker(self.session, vq)
        needs_reset = False
        try:
            worker._process()
        except (BrokenRing, NoStatusByte):
            needs_reset = True  # what QueueWorker._run turns into NEEDS_RESET
        finally:
            os.close(worker._stop_fd)
            vq.unmap()
        self.check(popped, pushed, needs_reset, pending)

    def check(
        self,
        popped: list[DescChain],
        pushed: list[tuple[int, int]],
        needs_reset: bool,
        pending: int,
    ) -> None:
        self.guest.check()
        self.image.check_size()
        self.internal.check()
        if len(popped) > pending:
            raise InvariantBroken(f"{len(popped)} requests taken, {pending} made available")
        unanswered = collections.Counter(c.head for c in popped)
        unanswered.subtract(head for head, _ in pushed)
        if any(n < 0 for n in unanswered.values()):
            raise InvariantBroken(f"a request was completed twice: {pushed}")
        left = sum(unanswered.values())
        if left > 1 or (left == 1 and not needs_reset):
            raise InvariantBroken(f"{left} requests never completed (needs_reset={needs_reset})")
        for chain, (_, used_len) in zip(popped, pushed, strict=False):
            if used_len > sum(b.length for b in chain.writable):
                raise InvariantBroken(f"used length {used_len} exceeds the writable buffers")
        self.rss.tick()


def main() -> None:
    target = Target()
    atheris.Setup(sys.argv, target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
