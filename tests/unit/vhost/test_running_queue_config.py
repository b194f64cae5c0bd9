"""A running queue's size, addresses and index cannot be changed under its thread.

Found by the atheris message fuzzer (fuzz/vhost_messages.py): SET_VRING_NUM for a
started queue changed the size its thread indexes the mapped rings with, and the
next request ended in an internal error (IndexError in enable_notification).
"""

from __future__ import annotations

import pytest

from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.protocol import VhostUserRequest, VhostVringAddr, VhostVringState
from harness.vhost.virtio import DeviceStatus, VirtioBlkStatus


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, 256)),
        (VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, 2)),
        (VhostUserRequest.SET_VRING_BASE, VhostVringState.pack(0, 77)),
        (VhostUserRequest.SET_VRING_ADDR, VhostVringAddr.pack(0, 0, 0, 0, 0, 0)),
    ],
    ids=["larger-size", "smaller-size", "base", "addresses"],
)
def test_ring_setup_for_a_running_queue_is_refused_and_the_queue_keeps_serving(
    fe: VhostUserFrontend, request_: VhostUserRequest, payload: bytes
) -> None:
    assert fe.write(0, b"a" * 4096).status == VirtioBlkStatus.OK  # queue 0 runs
    assert fe.request(request_, payload) == 1  # nacked
    for i in range(40):  # past the ring's end: the old size still holds
        assert fe.write(8 * i, bytes([i]) * 4096).status == VirtioBlkStatus.OK
    assert fe.read(8 * 39, 4096).data == bytes([39]) * 4096
    status = fe.get_u64(VhostUserRequest.GET_STATUS)
    assert not status & DeviceStatus.DEVICE_NEEDS_RESET


def test_a_stopped_queue_can_be_resized_and_started_again(fe: VhostUserFrontend) -> None:
    q = fe.queues[0]
    assert fe.write(0, b"b" * 512).status == VirtioBlkStatus.OK
    base = fe.stop_queue(q)
    assert fe.request(VhostUserRequest.SET_VRING_NUM, VhostVringState.pack(0, q.num)) == 0
    fe.start_queue(q, base)
    assert fe.read(0, 512).data == b"b" * 512
