"""The NBD transmission phase: requests in, simple replies out, for one connection.

Each request maps onto the export's BlockBackend one to one, so the graph
sees exactly what the client sent:

    NBD_CMD_READ                      -> readv
    NBD_CMD_WRITE (+NBD_CMD_FLAG_FUA) -> writev(fua=...)   (the block stack's FUA flag)
    NBD_CMD_FLUSH                     -> flush              (of the whole graph)
    NBD_CMD_TRIM (+FUA)               -> discard (then flush)
    NBD_CMD_WRITE_ZEROES              -> write_zeroes(may_unmap=not NO_HOLE, fua=...,
                                                      no_fallback=FAST_ZERO)
    NBD_CMD_DISC                      -> finish what is in flight, close

Everything is checked before the graph is touched: a request outside the
export, with a flag not valid for its command, or modifying a read-only
export gets an error reply (EINVAL for reads and trims out of range, ENOSPC
for writes and write-zeroes, EPERM when read-only, as "Error values" says)
and reaches no node. The connection is dropped only when the stream cannot
be followed any more: a bad request magic, a write payload larger than the
advertised maximum (it would have to be read to stay in step), or the end
of the stream.

Requests run on the connection's thread in arrival order, with one reused,
page-aligned buffer: for page-cached images that is the fastest way in
Python (a hand-off to another thread costs more than the copy). With
`parallel` (by default only for O_DIRECT graphs, where a request waits for
the device), reads and writes of at least PARALLEL_MIN bytes run on helper
threads so they overlap as a client's queue depth intends; replies then
leave in completion order, which NBD allows. A flush still covers every
write replied to before it arrived: those writes have completed.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from harness.errors import BlockError, NbdProtocolError
from harness.nbd.channel import Channel, ClientGone
from harness.nbd.export import MAX_PAYLOAD, NbdExport
from harness.nbd.protocol import (
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    CmdFlag,
    NbdCmd,
    NbdRequest,
    NbdSimpleReply,
    command_name,
    nbd_error,
)

log = logging.getLogger(__name__)

PARALLEL_MIN = 4096
PARALLEL_THREADS = 8

_READ = int(NbdCmd.READ)
_WRITE = int(NbdCmd.WRITE)
_DISC = int(NbdCmd.DISC)
_FLUSH = int(NbdCmd.FLUSH)
_TRIM = int(NbdCmd.TRIM)
_WRITE_ZEROES = int(NbdCmd.WRITE_ZEROES)
_FUA = int(CmdFlag.FUA)
_NOT_FUA = 0xFFFF & ~_FUA
_ZERO_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_COMMANDS = 9  # counters per known command type; the last slot counts unknown ones
_reply_header = NbdSimpleReply.pack


class Transmission:
    """Serve one negotiated connection until NBD_CMD_DISC or the end of the stream."""

    def __init__(
        self,
        channel: Channel,
        export: NbdExport,
        *,
        parallel: bool = False,
        on_request: Callable[[int], None] | None = None,
    ) -> None:
        self.channel = channel
        self.export = export
        self.counts = [0] * (_COMMANDS + 1)
        self.errors = 0
        self._buf: mmap.mmap | None = None
        self._view = memoryview(bytearray())
        self._pool = (
            ThreadPoolExecutor(PARALLEL_THREADS, thread_name_prefix="nbd-io") if parallel else None
        )
        self._send_lock = threading.Lock()
        self._send = self._send_locked if parallel else channel.send
        self._sendv = self._sendv_locked if parallel else channel.sendv
        self._on_request = on_request

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Serve requests; returns on NBD_CMD_DISC or EOF, raises NbdProtocolError to drop."""
        try:
            self._loop()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # "handle all outstanding requests"
            self._view = memoryview(bytearray())
            self._buf = None

    def _loop(self) -> None:
        readinto = self.channel.readinto
        header = bytearray(NbdRequest.size)
        hview = memoryview(header)
        unpack = NbdRequest.unpack_from
        counts = self.counts
        export = self.export
        size = export.size
        backend = export.backend
        read_only = export.read_only
        pool = self._pool
        on_request = self._on_request
        while True:
            try:
                n = readinto(hview)
            except OSError as exc:
                raise ClientGone(f"connection lost: {exc}") from exc
            if n != NbdRequest.size:
                if n == 0:
                    return  # gone without NBD_CMD_DISC: a hard disconnect
                raise ClientGone(f"connection closed inside a request header ({n} bytes)")
            magic, flags, cmd, handle, offset, length = unpack(header)
            if magic != NBD_REQUEST_MAGIC:
                raise NbdProtocolError(f"request magic {magic:#x} is not NBD_REQUEST_MAGIC")
            counts[cmd if cmd < _COMMANDS else _COMMANDS] += 1
            if on_request is not None:
                on_request(cmd)
            if cmd == _READ:
                if flags & _NOT_FUA or length > MAX_PAYLOAD or offset + length > size:
                    self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)
                elif pool is not None and length >= PARALLEL_MIN:
                    pool.submit(self._read_job, handle, offset, length)
                elif not length:  # nothing to read: the graph is not asked
                    self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle))
                else:
                    view = self._data(length)
                    try:
                        backend.readv(offset, [view])
                    except (BlockError, OSError) as exc:
                        self._failed(cmd, exc, handle, offset, length)
                        continue
                    self._sendv((_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle), view))
            elif cmd == _WRITE:
                if length > MAX_PAYLOAD:
                    raise NbdProtocolError(
                        f"NBD_CMD_WRITE of {length} bytes is larger than the advertised "
                        f"maximum payload ({MAX_PAYLOAD}); dropping the connection"
                    )
                parallel = pool is not None and length >= PARALLEL_MIN
                view = _buffer(length) if parallel else self._data(length)
                self.channel.read_into(view)  # always consumed, even when refused
                if flags & _NOT_FUA:
                    self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)
                elif read_only:
                    self._refuse(cmd, NBD_EPERM, handle, flags, offset, length)
                elif offset + length > size:
                    self._refuse(cmd, NBD_ENOSPC, handle, flags, offset, length)
                elif parallel:
                    assert pool is not None
                    pool.submit(self._write_job, handle, offset, view, bool(flags & _FUA))
                elif not length:
                    self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle))
                else:
                    try:
                        backend.writev(offset, [view], fua=bool(flags & _FUA))
                    except (BlockError, OSError) as exc:
                        self._failed(cmd, exc, handle, offset, length)
                        continue
                    self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle))
            elif cmd == _FLUSH:
                if flags & _NOT_FUA or offset or length:
                    self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)
                else:
                    self._run(cmd, handle, offset, length, backend.flush)
            elif cmd == _TRIM:
                if flags & _NOT_FUA or offset + length > size:
                    self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)
                elif read_only:
                    self._refuse(cmd, NBD_EPERM, handle, flags, offset, length)
                else:
                    self._run(cmd, handle, offset, length, self._trim, offset, length, flags)
            elif cmd == _WRITE_ZEROES:
                if flags & ~_ZERO_FLAGS:
                    self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)
                elif read_only:
                    self._refuse(cmd, NBD_EPERM, handle, flags, offset, length)
                elif offset + length > size:
                    self._refuse(cmd, NBD_ENOSPC, handle, flags, offset, length)
                else:
                    self._run(cmd, handle, offset, length, self._zeroes, offset, length, flags)
            elif cmd == _DISC:
                log.debug("%s: NBD_CMD_DISC", self.channel.peer)
                return
            else:
                # NBD_CMD_CACHE, BLOCK_STATUS, RESIZE were not advertised; unknown ones never.
                self._refuse(cmd, NBD_EINVAL, handle, flags, offset, length)

    # -- requests ------------------------------------------------------------------

    def _trim(self, offset: int, length: int, flags: int) -> None:
        if not length:
            return
        backend = self.export.backend
        backend.discard(offset, length)
        if flags & _FUA:
            backend.flush()  # what the trim changed is stable before the reply

    def _zeroes(self, offset: int, length: int, flags: int) -> None:
        if not length:
            return
        self.export.backend.write_zeroes(
            offset,
            length,
            may_unmap=not flags & _NO_HOLE,
            fua=bool(flags & _FUA),
            no_fallback=bool(flags & _FAST_ZERO),
        )

    def _run(
        self, cmd: int, handle: int, offset: int, length: int, fn: Callable[..., None], *args: int
    ) -> None:
        try:
            fn(*args)
        except (BlockError, OSError) as exc:
            self._failed(cmd, exc, handle, offset, length)
            return
        self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle))

    def _read_job(self, handle: int, offset: int, length: int) -> None:
        view = _buffer(length)
        try:
            self.export.backend.readv(offset, [view])
        except (BlockError, OSError) as exc:
            self._failed_quietly(_READ, exc, handle, offset, length)
            return
        with contextlib.suppress(ClientGone):  # the reader thread sees the end too
            self._sendv((_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle), view))

    def _write_job(self, handle: int, offset: int, view: memoryview, fua: bool) -> None:
        try:
            self.export.backend.writev(offset, [view], fua=fua)
        except (BlockError, OSError) as exc:
            self._failed_quietly(_WRITE, exc, handle, offset, len(view))
            return
        with contextlib.suppress(ClientGone):
            self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, 0, handle))

    # -- replies -------------------------------------------------------------------

    def _refuse(
        self, cmd: int, error: int, handle: int, flags: int, offset: int, length: int
    ) -> None:
        """A request the client should not have sent: an error reply, the graph untouched."""
        self.errors += 1
        log.debug(
            "%s: %s flags %#x offset %d length %d refused with error %d (export %r, %d bytes)",
            self.channel.peer,
            command_name(cmd),
            flags,
            offset,
            length,
            error,
            self.export.name,
            self.export.size,
        )
        self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, error, handle))

    def _failed(
        self, cmd: int, exc: BlockError | OSError, handle: int, offset: int, length: int
    ) -> None:
        """The graph failed the request: its errno, as an NBD error, is the reply."""
        self.errors += 1
        error = nbd_error(exc.errno)
        log.warning(
            "%s: %s of %d bytes at %d failed, client told error %d: %s",
            self.channel.peer,
            command_name(cmd),
            length,
            offset,
            error,
            exc,
        )
        self._send(_reply_header(NBD_SIMPLE_REPLY_MAGIC, error, handle))

    def _failed_quietly(
        self, cmd: int, exc: BlockError | OSError, handle: int, offset: int, length: int
    ) -> None:
        with contextlib.suppress(ClientGone):
            self._failed(cmd, exc, handle, offset, length)

    def _send_locked(self, data: bytes) -> None:
        with self._send_lock:
            self.channel.send(data)

    def _sendv_locked(self, buffers: tuple[bytes, memoryview]) -> None:
        with self._send_lock:
            self.channel.sendv(buffers)

    def _data(self, length: int) -> memoryview:
        """The connection's buffer, at least `length` bytes, page-aligned (for O_DIRECT)."""
        if length > len(self._view):
            # The old buffer goes with its last view (a view of it may still be held).
            size = max(length, 1 << 20)
            self._buf = mmap.mmap(-1, size)
            self._view = memoryview(self._buf)
        return self._view[:length]


def _buffer(length: int) -> memoryview:
    """A page-aligned buffer of its own, for a request that runs on a helper thread."""
    return memoryview(mmap.mmap(-1, max(length, 1)))[:length]
