"""Property: any vhost-user message gets exactly one answer and never kills the backend."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.testing.vhost_frontend import VhostUserFrontend
from harness.vhost.protocol import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    Message,
    ProtocolFeature,
    VhostUserRequest,
    VhostUserU64,
    recv_message,
    send_message,
)
from harness.vhost.virtio import VirtioBlkStatus

from .conftest import Served

message = st.fixed_dictionaries(
    {
        # Not SET_PROTOCOL_FEATURES: turning REPLY_ACK off legitimately ends the acks.
        "request": st.integers(0, 45).filter(lambda r: r != VhostUserRequest.SET_PROTOCOL_FEATURES),
        "payload": st.one_of(
            st.binary(max_size=300),
            # Plausible shapes with hostile values: u64, vring state, region, inflight.
            st.binary(min_size=8, max_size=8),
            st.binary(min_size=40, max_size=40),
            st.binary(min_size=24, max_size=24),
        ),
        "fds": st.sampled_from(["none", "memfd", "eventfd", "two"]),
    }
)


def _fds(kind: str) -> list[int]:
    def memfd() -> int:
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 16)
        return fd

    if kind == "memfd":
        return [memfd()]
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    if kind == "two":
        return [memfd(), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    return []


def test_random_messages_get_one_answer_and_never_kill_the_backend(
    serve: Callable[..., Served],
) -> None:
    s = serve(num_queues=2)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(s.socket))
    try:
        send_message(sock, Message(VhostUserRequest.GET_FEATURES))
        recv_message(sock)
        pf = (
            (1 << ProtocolFeature.REPLY_ACK)
            | (1 << ProtocolFeature.CONFIG)
            | (1 << ProtocolFeature.INFLIGHT_SHMFD)
        )
        send_message(
            sock, Message(VhostUserRequest.SET_PROTOCOL_FEATURES, payload=VhostUserU64.pack(pf))
        )

        @settings(max_examples=150, deadline=None, database=None)
        @given(msg=message)
        def check(msg: dict) -> None:
            fds = _fds(msg["fds"])
            try:
                send_message(
                    sock,
                    Message(
                        msg["request"],
                        VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                        msg["payload"],
                        fds,
                    ),
                )
            finally:
                for fd in fds:
                    os.close(fd)
            reply = recv_message(sock)  # exactly one: its own reply, or the ack
            reply.close_fds()
            assert reply.request == msg["request"]
            assert reply.flags & VHOST_USER_REPLY_MASK
            assert s.server.session is not None

        check()
    finally:
        sock.close()
    # Whatever that connection did, the next frontend is served normally.
    with VhostUserFrontend(s.socket) as fe:
        fe.negotiate(num_queues=2)
        assert fe.write(0, b"f" * 4096).status == VirtioBlkStatus.OK
        assert fe.read(0, 4096).data == b"f" * 4096
