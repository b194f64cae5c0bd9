"""The vhost-user wire protocol: message codes, feature bits and payload layouts.

Everything here follows QEMU's docs/interop/vhost-user.rst ("Message
specification", "Front-end message types"). A message is a 12-byte header
followed by `size` bytes of payload; file descriptors travel beside it as
SCM_RIGHTS ancillary data. All integers are little-endian.
"""

from __future__ import annotations

import array
import contextlib
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

from harness.errors import ProtocolError

# vhost-user.rst "Header": u32 request, u32 flags, u32 size.
VhostUserMsgHeader = struct.Struct("<III")
# vhost-user.rst "A single 64-bit integer".
VhostUserU64 = struct.Struct("<Q")
# vhost-user.rst "A vring state description": u32 index, u32 num.
VhostVringState = struct.Struct("<II")
# vhost-user.rst "A vring address description":
# u32 index, u32 flags, u64 descriptor, u64 used, u64 available, u64 log.
VhostVringAddr = struct.Struct("<IIQQQQ")
# vhost-user.rst "Memory region description":
# u64 guest address, u64 size, u64 user address, u64 mmap offset.
VhostUserMemoryRegion = struct.Struct("<QQQQ")
# vhost-user.rst "Multiple Memory regions description": u32 nregions, u32 padding.
VhostUserMemoryHeader = struct.Struct("<II")
# vhost-user.rst "Single memory region description": u64 padding + a region.
VhostUserMemRegMsg = struct.Struct("<QQQQQ")
# vhost-user.rst "Device config space": u32 offset, u32 size, u32 flags, then payload.
VhostUserConfigHeader = struct.Struct("<III")
# vhost-user.rst "Inflight description":
# u64 mmap size, u64 mmap offset, u16 num queues, u16 queue size.
VhostUserInflight = struct.Struct("<QQHH4x")  # padded to 8 as the C struct is
# vhost-user.rst "Log description": u64 log size, u64 log offset.
VhostUserLog = struct.Struct("<QQ")

HEADER_SIZE = VhostUserMsgHeader.size
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

# In the u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 the index, bit 8 "no fd".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

# At most this many fds ride on one message (VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_USER_MAX_FDS = 8
VHOST_MEMORY_BASELINE_NREGIONS = 8
# The biggest payload we accept; a SET_MEM_TABLE with 8 regions is 264 bytes,
# a config space at most 256. Anything larger is a broken or hostile frontend.
MAX_PAYLOAD = 4096

# The virtio feature bit that says "protocol features exist" (vhost-user.rst).
VHOST_USER_F_PROTOCOL_FEATURES = 30


class VhostUserRequest(enum.IntEnum):
    """Front-end message types (vhost-user.rst)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def feature_mask(*bits: int) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


@dataclass
class Message:
    """One vhost-user message. `fds` are owned by the message until taken."""

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def name(self) -> str:
        try:
            return VhostUserRequest(self.request).name
        except ValueError:
            return f"request {self.request}"

    def u64(self) -> int:
        if len(self.payload) < VhostUserU64.size:
            raise ProtocolError(
                f"{self.name}: payload of {len(self.payload)} bytes, expected a u64"
            )
        value: int = VhostUserU64.unpack_from(self.payload)[0]
        return value

    def take_fd(self) -> int:
        """Remove and return the first fd; the caller now owns it."""
        if not self.fds:
            raise ProtocolError(f"{self.name} arrived without the file descriptor it needs")
        return self.fds.pop(0)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def encode(self) -> bytes:
        return VhostUserMsgHeader.pack(self.request, self.flags, len(self.payload)) + self.payload


def reply_to(msg: Message, payload: bytes, fds: list[int] | None = None) -> Message:
    return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload, fds or [])


class ConnectionClosed(ProtocolError):
    """The peer closed the socket (a clean end, or the frontend died)."""


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    got = 0
    fd_space = socket.CMSG_SPACE(VHOST_USER_MAX_FDS * array.array("i").itemsize)
    while got < n:
        data, ancdata, msg_flags, _ = sock.recvmsg(n - got, fd_space)
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
                fds.extend(arr)
        if msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            fds.clear()
            raise ProtocolError(
                "more file descriptors than vhost-user allows arrived on one message"
            )
        if not data:
            for fd in fds:
                os.close(fd)
            fds.clear()
            raise ConnectionClosed("vhost-user peer closed the connection")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> Message:
    """Read one whole message (header, payload, fds) from a blocking socket."""
    fds: list[int] = []
    header = _recv_exact(sock, HEADER_SIZE, fds)
    request, flags, size = VhostUserMsgHeader.unpack(header)
    if size > MAX_PAYLOAD:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(
            f"vhost-user message {request} claims a {size}-byte payload (limit {MAX_PAYLOAD}); "
            "the frontend is broken"
        )
    payload = _recv_exact(sock, size, fds) if size else b""
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    data = msg.encode()
    if msg.fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.sendmsg([data])
    if sent != len(data):
        sock.sendall(data[sent:])
