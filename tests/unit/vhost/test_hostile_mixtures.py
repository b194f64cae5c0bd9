"""Random mixtures of malformed rings across several queues at once (issue 7).

Each trial (a fixed seed) fills four queues with a random mixture of valid
requests and every descriptor, header and status defect of the backend issue's
list that has a status to write; some queues end with a defect that has none
(a loop, a bad next or head, bad indirect tables, no or a read-only status
byte...). Every request must get its expected status, the queues ending in
such a defect must go to NEEDS_RESET with an err signal while the others keep
serving, valid data must be right, and after the guest's reset everything works.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from harness.testing.vhost_frontend import Seg, VhostUserFrontend
from harness.vhost.protocol import VhostUserRequest
from harness.vhost.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceStatus,
    VirtioBlkOuthdr,
    VirtioBlkRequestType,
    VirtioBlkStatus,
    VirtqDesc,
)

from .conftest import IMAGE_SIZE, Served

OK, IOERR, UNSUPP = VirtioBlkStatus.OK, VirtioBlkStatus.IOERR, VirtioBlkStatus.UNSUPP
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
IN, OUT, FLUSH = VirtioBlkRequestType.IN, VirtioBlkRequestType.OUT, VirtioBlkRequestType.FLUSH
QUEUES = 4
SECTORS_PER_QUEUE = 1024  # each queue writes its own range: no ordering across queues
CAPACITY = IMAGE_SIZE // 512
WILD = 0xDEAD_0000_0000

# Defects that complete the request with a status (the queue keeps going).
STATUS_DEFECTS = (
    "writable-before-readable",
    "no-header",
    "short-header",
    "unknown-type",
    "beyond-disk",
    "misaligned",
    "data-outside-memory",
    "data-off-region-end",
)
# Defects with no status to write: the queue stops and the device needs a reset.
RESET_DEFECTS = (
    "loop",
    "self-loop",
    "next-out-of-range",
    "head-out-of-range",
    "nested-indirect",
    "indirect-length-0",
    "indirect-length-17",
    "indirect-with-next",
    "indirect-outside-memory",
    "loop-in-indirect",
    "no-writable",
    "read-only-status",
    "empty-status",
    "status-outside-memory",
)


@dataclass(frozen=True)
class Expect:
    kind: str
    status: VirtioBlkStatus
    sector: int = -1
    data: bytes = b""  # what a valid read must return


class Mixer:
    """Builds one queue's requests on the test frontend."""

    def __init__(self, fe: VhostUserFrontend, rng: random.Random, written: dict[int, bytes]):
        self.fe = fe
        self.rng = rng
        self.written = written  # sector -> 512 bytes, what valid writes left on the disk

    def _header(self, rtype: int, sector: int = 0) -> int:
        addr = self.fe.mem.alloc(16)
        self.fe.mem.write(addr, VirtioBlkOuthdr.pack(rtype, 0, sector))
        return addr

    def _status(self) -> int:
        addr = self.fe.mem.alloc(1)
        self.fe.mem.write(addr, b"\xee")
        return addr

    def valid(self, q: int) -> Expect:
        sector = q * SECTORS_PER_QUEUE + self.rng.randrange(SECTORS_PER_QUEUE)
        if sector in self.written and self.rng.random() < 0.4:
            self.fe.submit(IN, sector, in_len=512, queue=q)
            return Expect("read", OK, sector, self.written[sector])
        if self.rng.random() < 0.1:
            self.fe.submit(FLUSH, 0, queue=q)
            return Expect("flush", OK)
        data = self.rng.randbytes(512)
        self.fe.submit(OUT, sector, data=data, queue=q, split=self.rng.choice([0, 128]))
        self.written[sector] = data
        return Expect("write", OK, sector)

    def status_defect(self, q: int, kind: str) -> Expect:
        fe, st = self.fe, self._status()
        data = fe.mem.alloc(512)
        segs: list[Seg]
        status = IOERR
        if kind == "writable-before-readable":
            segs = [Seg(data, 512, True), Seg(self._header(OUT, q * SECTORS_PER_QUEUE), 16)]
        elif kind == "no-header":
            segs = []
        elif kind == "short-header":
            segs = [Seg(self._header(IN), self.rng.choice([1, 8, 15]))]
        elif kind == "unknown-type":
            segs, status = [Seg(self._header(self.rng.choice([3, 5, 99, 0xFFFF])), 16)], UNSUPP
        elif kind == "beyond-disk":
            sector = self.rng.choice([CAPACITY, CAPACITY - 0, CAPACITY + 7, 1 << 40])
            segs = [Seg(self._header(IN, sector), 16), Seg(data, 512, True)]
        elif kind == "misaligned":
            segs = [Seg(self._header(OUT, q * SECTORS_PER_QUEUE), 16), Seg(data, 100)]
        elif kind == "data-outside-memory":
            segs = [Seg(self._header(IN), 16), Seg(self.rng.choice([0, WILD]), 512, True)]
        elif kind == "data-off-region-end":
            region = fe.mem.regions[0]
            end = region.guest_addr + region.size
            segs = [Seg(self._header(IN), 16), Seg(end - 256, 512, True)]
        else:
            raise AssertionError(kind)
        fe.submit_raw([*segs, Seg(st, 1, True)], queue=q, status_addr=st)
        return Expect(kind, status)

    def reset_defect(self, q: int, kind: str) -> None:
        """Publish a chain the device cannot answer; its descriptors are never returned."""
        fe = self.fe
        queue = fe.queues[q]
        i, j = queue.free_descs.pop(0), queue.free_descs.pop(0)
        hdr, st = self._header(FLUSH), self._status()
        descs: dict[int, tuple[int, int, int, int]] = {}
        head = i

        def table(entries: list[tuple[int, int, int, int]]) -> int:
            addr = fe.mem.alloc(16 * len(entries), 16)
            for n, e in enumerate(entries):
                fe.mem.write(addr + 16 * n, VirtqDesc.pack(*e))
            return addr

        good = [(hdr, 16, NEXT, 1), (st, 1, WRITE, 0)]
        if kind == "loop":
            descs = {i: (hdr, 16, NEXT, j), j: (st, 1, WRITE | NEXT, i)}
        elif kind == "self-loop":
            descs = {i: (hdr, 16, NEXT, i)}
        elif kind == "next-out-of-range":
            descs = {i: (hdr, 16, NEXT, queue.num + self.rng.randrange(1000))}
        elif kind == "head-out-of-range":
            head = queue.num + self.rng.randrange(1000)
        elif kind == "nested-indirect":
            descs = {i: (table([(table(good), 32, INDIRECT, 0)]), 16, INDIRECT, 0)}
        elif kind in ("indirect-length-0", "indirect-length-17"):
            descs = {i: (table(good), int(kind.rsplit("-", 1)[1]), INDIRECT, 0)}
        elif kind == "indirect-with-next":
            descs = {i: (table(good), 32, INDIRECT | NEXT, j), j: (st, 1, WRITE, 0)}
        elif kind == "indirect-outside-memory":
            descs = {i: (WILD, 32, INDIRECT, 0)}
        elif kind == "loop-in-indirect":
            descs = {i: (table([(hdr, 16, NEXT, 1), (st, 1, WRITE | NEXT, 0)]), 32, INDIRECT, 0)}
        elif kind == "no-writable":
            descs = {i: (hdr, 16, 0, 0)}
        elif kind == "read-only-status":
            descs = {i: (hdr, 16, NEXT, j), j: (st, 1, 0, 0)}
        elif kind == "empty-status":
            descs = {i: (hdr, 16, NEXT, j), j: (st, 0, WRITE, 0)}
        elif kind == "status-outside-memory":
            descs = {i: (hdr, 16, NEXT, j), j: (WILD, 1, WRITE, 0)}
        else:
            raise AssertionError(kind)
        for index, (addr, length, flags, nxt) in descs.items():
            queue.write_desc(index, addr, length, flags, nxt)
        queue.publish(head)


def needs_reset(fe: VhostUserFrontend) -> bool:
    return bool(fe.get_u64(VhostUserRequest.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET)


class Kinds:
    """Defect kinds in a seeded random order, round-robin, so a few trials cover them all."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[tuple[str, ...], list[str]] = {}
        self.seen: set[str] = set()

    def next(self, kinds: tuple[str, ...]) -> str:
        pending = self.queues.setdefault(kinds, [])
        if not pending:
            pending.extend(self.rng.sample(kinds, len(kinds)))
        kind = pending.pop()
        self.seen.add(kind)
        return kind


def run_trial(
    fe: VhostUserFrontend, served: Served, seed: int, written: dict[int, bytes], kinds: Kinds
) -> None:
    rng = random.Random(seed)
    mixer = Mixer(fe, rng, written)
    expected: dict[int, list[Expect]] = {}
    broken: set[int] = set()
    # Interleave the queues: requests land on all four while the others are being served.
    plan = {q: rng.randint(3, 10) for q in range(QUEUES)}
    order = [q for q in range(QUEUES) for _ in range(plan[q])]
    rng.shuffle(order)
    for q in order:
        if rng.random() < 0.5:
            expected.setdefault(q, []).append(mixer.valid(q))
        else:
            kind = kinds.next(STATUS_DEFECTS)
            expected.setdefault(q, []).append(mixer.status_defect(q, kind))
    ending = rng.sample(range(QUEUES), rng.randint(0, QUEUES - 1))  # one queue always lives
    for q in ending:
        # Submitted last on its queue: the requests before it must all complete first.
        mixer.reset_defect(q, kinds.next(RESET_DEFECTS))
        broken.add(q)
    for q, wanted in expected.items():
        done = fe.wait(q, count=len(wanted), timeout=20)
        assert [c.status for c in done] == [e.status for e in wanted], (seed, q, wanted)
        for c, e in zip(done, wanted, strict=True):
            if e.kind == "read":
                assert c.data == e.data, (seed, q, e.sector)
    for q in broken:
        assert fe.err_signalled(q, timeout=10), f"seed {seed}: queue {q} did not signal err"
    assert needs_reset(fe) == bool(broken), seed
    for q in set(range(QUEUES)) - broken:  # the others still serve
        assert fe.flush(queue=q).status == OK, (seed, q)
    stats = served.server.stats()
    assert all(qs["broken"] == (qs["index"] in broken) for qs in stats["queues"]), seed


@pytest.mark.parametrize("seeds", [range(0, 16), range(16, 32)], ids=["seeds0-15", "seeds16-31"])
def test_mixtures_of_malformed_rings_on_four_queues_get_the_expected_statuses(
    serve: Callable[..., Served], seeds: range
) -> None:
    served = serve(num_queues=QUEUES)
    fe = served.frontend(num_queues=QUEUES, queue_size=64)
    try:
        written: dict[int, bytes] = {}
        kinds = Kinds(random.Random(seeds[0]))
        for seed in seeds:
            run_trial(fe, served, seed, written, kinds)
            fe.reset_device()  # what a guest driver does on NEEDS_RESET
            assert not needs_reset(fe)
        # The backend serves every queue afterwards, and every valid write is on the disk.
        for q in range(QUEUES):
            assert fe.write(q * SECTORS_PER_QUEUE + 1023, b"z" * 512, queue=q).status == OK
        with open(served.image, "rb") as image:
            for sector, data in written.items():
                assert os.pread(image.fileno(), 512, sector * 512) == data, sector
        for sector, data in list(written.items())[:50]:
            q = sector // SECTORS_PER_QUEUE
            assert fe.read(sector, 512, queue=q).data == data
        assert os.path.getsize(served.image) == IMAGE_SIZE
        assert kinds.seen == set(STATUS_DEFECTS) | set(RESET_DEFECTS)
    finally:
        fe.close()


def test_every_listed_defect_is_in_the_mixture() -> None:
    # The backend issue's list, mapped onto the kinds above: none left out.
    listed = {
        "descriptor loops": {"loop", "self-loop", "loop-in-indirect"},
        "out-of-range next": {"next-out-of-range", "head-out-of-range"},
        "nested indirect tables": {"nested-indirect"},
        "bad indirect lengths": {"indirect-length-0", "indirect-length-17"},
        "writable-before-readable": {"writable-before-readable"},
        "missing or short headers": {"no-header", "short-header"},
        "missing or read-only status byte": {"no-writable", "read-only-status", "empty-status"},
        "requests beyond the disk or misaligned": {"beyond-disk", "misaligned"},
        "addresses outside the regions": {"data-outside-memory", "status-outside-memory"},
    }
    kinds = set(STATUS_DEFECTS) | set(RESET_DEFECTS)
    for what, needed in listed.items():
        assert needed <= kinds, what
