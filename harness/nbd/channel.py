"""One client connection's byte stream: exact reads, whole sends, one buffered reader.

Negotiation and transmission read through the same buffered reader, so bytes
a client sends early are never lost between the phases, and a pipelined
stream of small requests costs one `recv` per buffer-full instead of one per
request. Every read is exact: a short read is the client going away.
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Sequence
from typing import cast

from harness.errors import NbdProtocolError

READ_BUFFER = 256 << 10


class ClientGone(NbdProtocolError):
    """The client closed the connection (or it broke) — nothing more to serve."""


class Channel:
    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer or "client"
        self._rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=READ_BUFFER))
        self.readinto = self._rfile.readinto  # exact for a BufferedReader (or EOF short)

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes, or ClientGone."""
        if n == 0:
            return b""
        try:
            data = self._rfile.read(n)
        except OSError as exc:  # reset, or the negotiation timeout
            raise ClientGone(f"connection lost: {exc}") from exc
        if len(data) != n:
            raise ClientGone(f"connection closed after {len(data)} of {n} bytes")
        return data

    def read_into(self, view: memoryview) -> None:
        """Fill `view` exactly, or ClientGone."""
        try:
            n = self._rfile.readinto(view)
        except OSError as exc:
            raise ClientGone(f"connection lost: {exc}") from exc
        if n != len(view):
            raise ClientGone(f"connection closed after {n} of {len(view)} bytes")

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(f"connection lost while sending: {exc}") from exc

    def sendv(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send several buffers as one message (a reply header and its data)."""
        try:
            sent = self.sock.sendmsg(buffers)
            total = sum(len(b) for b in buffers)
            if sent == total:
                return
            for buf in buffers:  # a partial send: the rest, buffer by buffer
                if sent >= len(buf):
                    sent -= len(buf)
                    continue
                self.sock.sendall(memoryview(buf)[sent:])
                sent = 0
        except OSError as exc:
            raise ClientGone(f"connection lost while sending: {exc}") from exc

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        """Wake a thread blocked reading this connection (it then sees the end)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()
