"""atheris target: the vhost-user message handling from arbitrary message streams.

Each input is a stream of messages on a fresh connection (a socketpair to a
`Session`): the request, flags and payload are the fuzzer's, either raw or in
the shape the request expects (ring state, ring addresses inside the guest
memfd, memory tables and regions over memfds this target creates, inflight
and config headers), with the fds the protocol needs (memfds, eventfds).
Kicks start real queue workers over a block backend on a temp image.
Invariants: `_dispatch` never raises (the session loop has no handler for
it); a message gets at most one reply, and exactly one when it asked for an
ack and REPLY_ACK is on; closing the session leaves no fd behind; the image
keeps its size; memory stays flat.

    python fuzz/vhost_messages.py fuzz/corpus/vhost_messages -max_total_time=120
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["harness"]):
    import harness.block  # noqa: F401  (instrumented too: the requests reach it)
    from harness.errors import ProtocolError
    from harness.vhost.protocol import (
        VHOST_USER_NEED_REPLY_MASK,
        VHOST_USER_REPLY_MASK,
        VHOST_USER_VERSION,
        ConnectionClosed,
        Message,
        ProtocolFeature,
        VhostUserConfigHeader,
        VhostUserInflight,
        VhostUserMemoryHeader,
        VhostUserMemoryRegion,
        VhostUserMemRegMsg,
        VhostUserRequest,
        VhostUserU64,
        VhostVringAddr,
        VhostVringState,
        recv_message,
        send_message,
    )
    from harness.vhost.server import Session

from common import (
    GUEST_BASE,
    USER_BASE,
    GuardedMemfd,
    ImageDevice,
    InternalErrors,
    InvariantBroken,
    RssWatch,
)

NUM_QUEUES = 2
REGION_SIZE = 64 << 10
R = VhostUserRequest
U64_REQUESTS = {R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS}
FD_REQUESTS = {R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR}
STATE_REQUESTS = {R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE}


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Target:
    def __init__(self) -> None:
        self.image = ImageDevice.create(num_queues=NUM_QUEUES)
        self.guest = GuardedMemfd(REGION_SIZE)
        self.server: Any = SimpleNamespace(
            device=self.image.device,
            num_queues=NUM_QUEUES,
            parallel_min=0,
            note_needs_reset=lambda: None,
        )
        self.rss = RssWatch()
        self.internal = InternalErrors.install()
        self.messages = 0

    # -- building one message ------------------------------------------------------

    def memfd(self) -> int:
        return os.dup(self.guest.fd)

    def eventfd(self) -> int:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def region(self, fdp: atheris.FuzzedDataProvider) -> tuple[int, int, int, int]:
        """guest address, size, user address, mmap offset — mostly plausible."""
        if fdp.ConsumeIntInRange(0, 7) == 0:
            return tuple(fdp.ConsumeIntInRange(0, (1 << 64) - 1) for _ in range(4))  # type: ignore[return-value]
        size = REGION_SIZE if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, REGION_SIZE + 8192)
        shift = fdp.ConsumeIntInRange(0, 3) * REGION_SIZE
        offset = self.guest.offset if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 3 * 4096)
        return GUEST_BASE + shift, size, USER_BASE + shift, offset

    def payload_and_fds(
        self, fdp: atheris.FuzzedDataProvider, request: int
    ) -> tuple[bytes, list[int]]:
        if fdp.ConsumeIntInRange(0, 3) == 0:  # raw bytes and any fds
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 320))
            kind = fdp.ConsumeIntInRange(0, 3)
            fds = ([self.memfd()] if kind & 1 else []) + ([self.eventfd()] if kind & 2 else [])
            return payload, fds
        index = (
            fdp.ConsumeIntInRange(0, NUM_QUEUES)
            if fdp.ConsumeIntInRange(0, 7)
            else fdp.ConsumeInt(4) & 0xFFFFFFFF
        )
        if request in U64_REQUESTS:
            return VhostUserU64.pack(fdp.ConsumeIntInRange(0, (1 << 64) - 1)), []
        if request in FD_REQUESTS:
            nofd = fdp.ConsumeIntInRange(0, 7) == 0
            value = index | (1 << 8 if nofd else 0)
            return VhostUserU64.pack(value & ((1 << 64) - 1)), ([] if nofd else [self.eventfd()])
        if request in STATE_REQUESTS:
            num = (
                1 << fdp.ConsumeIntInRange(0, 9)
                if fdp.ConsumeBool()
                else fdp.ConsumeInt(4) & 0xFFFFFFFF
            )
            return VhostVringState.pack(index, num), []
        if request == R.SET_VRING_ADDR:
            base = USER_BASE + fdp.ConsumeIntInRange(0, 4) * 0x1000
            addrs = [
                base + fdp.ConsumeIntInRange(0, REGION_SIZE)
                if fdp.ConsumeIntInRange(0, 7)
                else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
                for _ in range(3)
            ]
            return VhostVringAddr.pack(index, 0, *addrs, 0), []
        if request == R.SET_MEM_TABLE:
            n = fdp.ConsumeIntInRange(0, 3)
            regions = b"".join(VhostUserMemoryRegion.pack(*self.region(fdp)) for _ in range(n))
            claimed = n if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 10)
            fds = [
                self.memfd()
                for _ in range(n if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 4))
            ]
            return VhostUserMemoryHeader.pack(claimed, 0) + regions, fds
        if request in (R.ADD_MEM_REG, R.REM_MEM_REG):
            fds = [self.memfd()] if request == R.ADD_MEM_REG or fdp.ConsumeBool() else []
            return VhostUserMemRegMsg.pack(0, *self.region(fdp)), fds
        if request in (R.GET_CONFIG, R.SET_CONFIG):
            offset, size = fdp.ConsumeIntInRange(0, 300), fdp.ConsumeIntInRange(0, 300)
            return VhostUserConfigHeader.pack(offset, size, 0) + fdp.ConsumeBytes(size), []
        if request in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
            size = fdp.ConsumeIntInRange(0, 1 << 16)
            offset = fdp.ConsumeIntInRange(0, 8192)
            fds = [self.memfd()] if request == R.SET_INFLIGHT_FD else []
            queues, qsize = fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 1100)
            return VhostUserInflight.pack(size, offset, queues, qsize), fds
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), []

    def message(self, fdp: atheris.FuzzedDataProvider) -> Message:
        if fdp.ConsumeIntInRange(0, 15):
            request = fdp.ConsumeIntInRange(1, 41)
        else:
            request = fdp.ConsumeInt(4) & 0xFFFFFFFF
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if fdp.ConsumeBool() else 0)
        if fdp.ConsumeIntInRange(0, 15) == 0:
            flags = fdp.ConsumeInt(4) & 0xFFFFFFFF
        payload, fds = self.payload_and_fds(fdp, request)
        return Message(request, flags, payload, fds)

    # -- one input -----------------------------------------------------------------

    def preamble(self, fdp: atheris.FuzzedDataProvider) -> tuple[list[Message], list[int]]:
        """QEMU's start-up for 1-2 queues (memory, size, addresses, call, kick) over
        rings whose bytes are the fuzzer's, so later messages meet running queues."""
        region = self.guest.region()
        region[:] = bytes(REGION_SIZE)
        rings = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 0x2000))
        region[: len(rings)] = rings
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 0x1000))
        region[0x2000 : 0x2000 + len(data)] = data
        table = VhostUserMemoryHeader.pack(1, 0) + VhostUserMemoryRegion.pack(
            GUEST_BASE, REGION_SIZE, USER_BASE, self.guest.offset
        )
        msgs = [Message(R.SET_MEM_TABLE, VHOST_USER_VERSION, table, [self.memfd()])]
        kicks: list[int] = []
        for q in range(fdp.ConsumeIntInRange(1, NUM_QUEUES)):
            base = USER_BASE + q * 0x1000
            kick = self.eventfd()
            kicks.append(os.dup(kick))
            msgs += [
                Message(R.SET_VRING_NUM, VHOST_USER_VERSION, VhostVringState.pack(q, 16)),
                Message(
                    R.SET_VRING_ADDR,
                    VHOST_USER_VERSION,
                    VhostVringAddr.pack(q, 0, base, base + 0x800, base + 0x400, 0),
                ),
                Message(
                    R.SET_VRING_CALL, VHOST_USER_VERSION, VhostUserU64.pack(q), [self.eventfd()]
                ),
                Message(R.SET_VRING_KICK, VHOST_USER_VERSION, VhostUserU64.pack(q), [kick]),
            ]
        return msgs, kicks

    def run(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        fds_before = _fd_count()
        exposed = False  # a region the fuzzer gave covers a canary page: those may change
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        session = Session(self.server, theirs)
        kicks: list[int] = []
        try:
            # Mostly negotiate first, as QEMU does, so deeper handlers are reachable.
            if fdp.ConsumeIntInRange(0, 3):
                session.features = self.image.device.features()
                session.protocol_features = (1 << ProtocolFeature.REPLY_ACK) | (
                    1 << ProtocolFeature.CONFIG
                )
            queued: list[Message] = []
            if fdp.ConsumeBool():
                queued, kicks = self.preamble(fdp)
            for _ in range(len(queued) + fdp.ConsumeIntInRange(1, 24)):
                if not queued and fdp.remaining_bytes() == 0:
                    break
                msg = queued.pop(0) if queued else self.message(fdp)
                try:
                    send_message(ours, msg)
                finally:
                    for fd in msg.fds:
                        os.close(fd)
                try:
                    received = recv_message(theirs)
                except (ConnectionClosed, ProtocolError, OSError):
                    break  # Session.run ends the connection here
                self.messages += 1
                exposed = exposed or self.exposes_canary(received)
                session._dispatch(received)  # anything raised is a finding
                # After the handler: SET_PROTOCOL_FEATURES may just have turned acks off.
                acked = received.need_reply and session._has(ProtocolFeature.REPLY_ACK)
                self.check_replies(ours, received.request, acked)
                if kicks and fdp.ConsumeBool():
                    os.eventfd_write(kicks[fdp.ConsumeIntInRange(0, len(kicks) - 1)], 1)
        finally:
            session.close()
            for fd in kicks:
                os.close(fd)
            with contextlib.suppress(OSError):
                ours.close()
        self.image.check_size()
        if exposed:
            self.guest.restore()
        else:
            self.guest.check()
        self.internal.check()
        left = _fd_count() - fds_before
        if left > 0:
            raise InvariantBroken(f"{left} fds left open after the session closed")
        self.rss.tick()

    def exposes_canary(self, msg: Message) -> bool:
        """Whether this message maps memfd bytes outside the guest area (then the
        backend may write them legitimately: the canaries cannot judge it)."""
        regions: list[tuple[int, int]] = []  # (mmap offset, size)
        if msg.request in FD_REQUESTS | {R.SET_INFLIGHT_FD}:
            # The guest memfd as an eventfd (signalled with write()) or as the inflight
            # region: the frontend's own file, written where it asked.
            guest = os.fstat(self.guest.fd).st_ino
            return any(os.fstat(fd).st_ino == guest for fd in msg.fds)
        try:
            if msg.request == R.SET_MEM_TABLE:
                n = min(VhostUserMemoryHeader.unpack_from(msg.payload)[0], 8)
                for i in range(n):
                    at = VhostUserMemoryHeader.size + i * VhostUserMemoryRegion.size
                    _, size, _, offset = VhostUserMemoryRegion.unpack_from(msg.payload, at)
                    regions.append((offset, size))
            elif msg.request == R.ADD_MEM_REG:
                _, _, size, _, offset = VhostUserMemRegMsg.unpack_from(msg.payload)
                regions.append((offset, size))
        except struct.error:
            return False
        low, high = self.guest.offset, self.guest.offset + REGION_SIZE
        return any(offset < low or offset + size > high for offset, size in regions if size)

    def check_replies(self, sock: socket.socket, request: int, acked: bool) -> None:
        replies: list[Message] = []
        while True:
            try:
                reply = recv_message(sock)
            except (BlockingIOError, ConnectionClosed):
                break
            reply.close_fds()
            replies.append(reply)
        if len(replies) > 1:
            raise InvariantBroken(f"request {request} got {len(replies)} replies")
        if acked and not replies:
            raise InvariantBroken(f"request {request} asked for an ack and got no reply")
        for reply in replies:
            if reply.request != request or not reply.flags & VHOST_USER_REPLY_MASK:
                raise InvariantBroken(f"request {request} answered by {reply.request}")


def main() -> None:
    target = Target()
    atheris.Setup(sys.argv, target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
