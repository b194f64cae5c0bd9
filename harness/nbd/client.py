"""A small NBD client speaking the same wire structures: for tests, fuzzers and benchmarks.

Real clients (QEMU's NBD driver, qemu-img, qemu-io, libnbd) are what the
server is tested against; this one exists to say what they cannot: exact
command flags, requests a real client would never send, half a message, a
handshake cut off anywhere. It is synchronous (one request at a time)
unless the caller uses `send_request`/`recv_reply` to pipeline.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.errors import NbdProtocolError
from harness.nbd.protocol import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_NO_ZEROES,
    NBD_OPT_REPLY_MAGIC,
    NBD_REP_FLAG_ERROR,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    CmdFlag,
    NbdClientFlags,
    NbdCmd,
    NbdInfo,
    NbdInfoBlockSize,
    NbdInfoExport,
    NbdNewstyleHandshake,
    NbdOpt,
    NbdOptionHeader,
    NbdOptionReplyHeader,
    NbdRep,
    NbdRequest,
    NbdSimpleReply,
    NbdU16,
    NbdU32,
)


@dataclass
class OptionReply:
    option: int
    rep: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.rep & NBD_REP_FLAG_ERROR)


@dataclass
class ExportInfo:
    size: int = 0
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_sizes: tuple[int, int, int] | None = None
    replies: list[OptionReply] = field(default_factory=list)


class NbdReplyError(NbdProtocolError):
    """The server answered a request with an NBD error value."""

    def __init__(self, cmd: int, error: int) -> None:
        super().__init__(f"NBD_CMD {cmd} failed with NBD error {error}")
        self.error = error


class NbdClient:
    """One connection: `handshake()` (or the option helpers), then requests."""

    def __init__(self, address: str | Path | tuple[str, int], timeout: float = 30.0) -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(address))
            except OSError:
                self.sock.close()
                raise
        self.handshake_flags = 0
        self.export: ExportInfo | None = None
        self._handle = 0

    # -- raw bytes -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"server closed the connection after {len(out)} of {n}")
            out += chunk
        return bytes(out)

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server has closed (or reset) the connection within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionError, OSError):
            return True

    # -- handshake -------------------------------------------------------------------

    def greeting(self, client_flags: int | None = None) -> int:
        magic, opt_magic, flags = NbdNewstyleHandshake.unpack(
            self.recv_exact(NbdNewstyleHandshake.size)
        )
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdProtocolError(f"not a newstyle NBD server ({magic:#x} {opt_magic:#x})")
        self.handshake_flags = flags
        if client_flags is None:
            client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
            if flags & NBD_FLAG_NO_ZEROES:
                client_flags |= NBD_FLAG_C_NO_ZEROES
        self.send(NbdClientFlags.pack(client_flags))
        return flags

    def send_option(self, opt: int, data: bytes = b"", *, length: int | None = None) -> None:
        size = len(data) if length is None else length
        self.send(NbdOptionHeader.pack(IHAVEOPT, opt, size) + data)

    def recv_option_reply(self) -> OptionReply:
        magic, opt, rep, length = NbdOptionReplyHeader.unpack(
            self.recv_exact(NbdOptionReplyHeader.size)
        )
        if magic != NBD_OPT_REPLY_MAGIC:
            raise NbdProtocolError(f"option reply magic {magic:#x}")
        return OptionReply(opt, rep, self.recv_exact(length))

    def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; every reply up to the final one (ACK or an error)."""
        self.send_option(opt, data)
        replies = []
        while True:
            reply = self.recv_option_reply()
            replies.append(reply)
            if reply.rep == NbdRep.ACK or reply.is_error:
                return replies

    def list_exports(self) -> list[str]:
        names = []
        for reply in self.option(NbdOpt.LIST):
            if reply.is_error:
                raise NbdProtocolError(f"NBD_OPT_LIST failed: {reply.rep:#x} {reply.data!r}")
            if reply.rep == NbdRep.SERVER:
                (n,) = NbdU32.unpack_from(reply.data)
                names.append(reply.data[4 : 4 + n].decode())
        return names

    def info(
        self, name: str, requests: tuple[int, ...] = (NbdInfo.BLOCK_SIZE,), *, go: bool = False
    ) -> ExportInfo:
        raw = name.encode()
        data = NbdU32.pack(len(raw)) + raw + NbdU16.pack(len(requests))
        data += b"".join(NbdU16.pack(r) for r in requests)
        replies = self.option(NbdOpt.GO if go else NbdOpt.INFO, data)
        info = ExportInfo(replies=replies)
        final = replies[-1]
        if final.is_error:
            raise NbdProtocolError(
                f"{'NBD_OPT_GO' if go else 'NBD_OPT_INFO'} {name!r} failed: "
                f"{final.rep:#x} {final.data.decode(errors='replace')}"
            )
        for reply in replies[:-1]:
            (kind,) = NbdU16.unpack_from(reply.data)
            if kind == NbdInfo.EXPORT:
                _, info.size, info.flags = NbdInfoExport.unpack(reply.data)
            elif kind == NbdInfo.NAME:
                info.name = reply.data[2:].decode()
            elif kind == NbdInfo.DESCRIPTION:
                info.description = reply.data[2:].decode()
            elif kind == NbdInfo.BLOCK_SIZE:
                _, *sizes = NbdInfoBlockSize.unpack(reply.data)
                info.block_sizes = (sizes[0], sizes[1], sizes[2])
        return info

    def handshake(self, name: str = "") -> ExportInfo:
        """Greeting, then NBD_OPT_GO: ready for requests."""
        self.greeting()
        self.export = self.info(name, (NbdInfo.BLOCK_SIZE, NbdInfo.NAME), go=True)
        return self.export

    # -- transmission ------------------------------------------------------------------

    def send_request(
        self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> int:
        self._handle += 1
        self.send(
            NbdRequest.pack(NBD_REQUEST_MAGIC, flags, cmd, self._handle, offset, length) + data
        )
        return self._handle

    def recv_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(handle, error, data): data only for a successful read of `read_length`."""
        magic, error, handle = NbdSimpleReply.unpack(self.recv_exact(NbdSimpleReply.size))
        if magic != NBD_SIMPLE_REPLY_MAGIC:
            raise NbdProtocolError(f"reply magic {magic:#x}")
        data = self.recv_exact(read_length) if read_length and not error else b""
        return handle, error, data

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> tuple[int, bytes]:
        """One request and its reply: (error, data)."""
        handle = self.send_request(cmd, offset, length, flags=flags, data=data)
        got, error, payload = self.recv_reply(length if cmd == NbdCmd.READ else 0)
        if got != handle:
            raise NbdProtocolError(f"reply for handle {got}, expected {handle}")
        return error, payload

    def _ok(self, cmd: int, error: int) -> None:
        if error:
            raise NbdReplyError(cmd, error)

    def read(self, offset: int, length: int) -> bytes:
        error, data = self.request(NbdCmd.READ, offset, length)
        self._ok(NbdCmd.READ, error)
        return data

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua else 0
        error, _ = self.request(NbdCmd.WRITE, offset, len(data), flags=flags, data=data)
        self._ok(NbdCmd.WRITE, error)

    def flush(self) -> None:
        self._ok(NbdCmd.FLUSH, self.request(NbdCmd.FLUSH)[0])

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua else 0
        self._ok(NbdCmd.TRIM, self.request(NbdCmd.TRIM, offset, length, flags=flags)[0])

    def write_zeroes(self, offset: int, length: int, *, flags: int = 0) -> None:
        self._ok(
            NbdCmd.WRITE_ZEROES, self.request(NbdCmd.WRITE_ZEROES, offset, length, flags=flags)[0]
        )

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.send_request(NbdCmd.DISC)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
