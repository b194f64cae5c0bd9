"""Property: any descriptor chain ends in a completion or NEEDS_RESET; the backend survives
and never writes to memory it was not given."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.protocol import VhostUserRequest
from harness.vhost.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceStatus,
    VirtioBlkOuthdr,
    VirtqDesc,
)

from .conftest import Served

QUEUE_SIZE = 16

descriptor = st.tuples(
    st.sampled_from(["buffer", "header", "table", "hidden", "wild", "edge"]),
    st.sampled_from([0, 1, 8, 15, 16, 17, 32, 512, 4096, 70000]),
    st.sets(st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT])),
    st.integers(0, QUEUE_SIZE + 4),
)
chain_strategy = st.fixed_dictionaries(
    {
        "descs": st.lists(descriptor, min_size=1, max_size=6),
        "indirect_table": st.lists(descriptor, min_size=0, max_size=5),
        "head": st.integers(0, QUEUE_SIZE + 2),
        "rtype": st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14, 99]),
        "sector": st.sampled_from([0, 7, 8, 16383, 16384, 1 << 40]),
    }
)


def test_random_chains_never_hurt_the_backend(serve: Callable[..., Served]) -> None:
    s = serve(num_queues=1)
    fe = VhostUserFrontend(s.socket, memory_sizes=(8 << 20, 1 << 20))
    try:
        hidden = fe.mem.regions.pop()  # never sent to the backend
        fe.negotiate(num_queues=1, queue_size=QUEUE_SIZE)
        fe.mem.regions.append(hidden)
        canary = os.urandom(hidden.size)
        fe.mem.write(hidden.guest_addr, canary)
        buffer = fe.mem.alloc(70000 + 16, 4096)
        table = fe.mem.alloc(16 * 8, 16)
        region = fe.mem.regions[0]
        places = {
            "buffer": buffer + 16,
            "header": buffer,
            "table": table,
            "hidden": hidden.guest_addr + 64,
            "wild": 0xFFFF_FFFF_FFFF_F000,
            "edge": region.guest_addr + region.size - 8,
        }

        @settings(max_examples=60, deadline=None, database=None)
        @given(case=chain_strategy)
        def check(case: dict) -> None:
            fe.reset_device()  # fresh rings, no NEEDS_RESET left from the last case
            fe.mem.write(buffer, VirtioBlkOuthdr.pack(case["rtype"], 0, case["sector"]))
            for i, (place, length, flags, nxt) in enumerate(case["indirect_table"]):
                fe.mem.write(table + 16 * i, VirtqDesc.pack(places[place], length, sum(flags), nxt))
            q = fe.queues[0]
            for i, (place, length, flags, nxt) in enumerate(case["descs"]):
                q.write_desc(i % QUEUE_SIZE, places[place], length, sum(flags), nxt)
            q.publish(case["head"])
            deadline = time.monotonic() + 10
            while q.used_idx() == 0:
                status = fe.get_u64(VhostUserRequest.GET_STATUS)
                if status & DeviceStatus.DEVICE_NEEDS_RESET:
                    break
                assert time.monotonic() < deadline, f"neither completion nor NEEDS_RESET: {case}"
                time.sleep(0.002)
            assert fe.get_u64(VhostUserRequest.GET_FEATURES)  # still serving this frontend
            assert s.server.session is not None
            assert fe.mem.read(hidden.guest_addr, hidden.size) == canary

        check()
    finally:
        fe.close()
