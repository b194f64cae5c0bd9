"""A host-side Ethernet switch for the private network of a cluster's guests.

Each guest's second NIC is QEMU's `-netdev stream` connected to one port of
this switch: a unix socket named after the node (`<dir>/<node>.sock`). Why
this and not another of QEMU's netdevs:

- `stream` over a unix socket needs no root, no tap device and no bridge,
  and binds no address: nothing outside this machine can reach the network
  or be reached from it (`dgram` and `socket` over 127.0.0.1 would put the
  guests' traffic on the host's loopback, where any local process can send
  into it).
- A connection per node makes the port the node's identity: a frame's
  sender is known from the socket it came in on, not from the MAC address
  it claims. A node's QEMU killed by a power cut is a cable pulled (the
  switch sees EOF and forgets the port's addresses); its next boot connects
  again and is the cable plugged back in. `dgram` has no such event, and a
  restarted QEMU cannot bind its own socket path again until someone
  removes the old one.
- Two guests connected back to back with `stream,server=on` on one side
  would make one node the other's server: its death would take the link
  down until the harness rewired it, and N > 2 needs a switch anyway.

The wire format is QEMU's (net/stream.c, `net_fill_rstate` in net/net.c):
each Ethernet frame is preceded by its length, 4 bytes big-endian
(`StreamFrameHeader`). A length of 0 or above QEMU's `NET_BUFSIZE` means the
stream is out of step: QEMU drops such a connection, and so does this
switch (the node's NIC is down until its next boot). A frame too short to
hold an Ethernet header is counted and dropped.

It is a learning switch: a unicast frame goes to the port its destination
MAC was last seen on, everything else (broadcast, multicast, unknown
destinations) to every other connected port. A port that cannot take a
frame right away queues it up to `QUEUE_LIMIT` bytes and drops beyond, as a
real switch drops on congestion; the switch never blocks on a slow guest.

It runs in its own process (`SwitchProcess`, a `ManagedProcess`: owned,
killed with the harness, its log kept), one thread on `selectors`, with a
JSON-lines control socket (`stats`, harness/control.py) for the counters
per port and the MAC addresses each port has shown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import selectors
import signal
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from harness.control import ControlServer, control_request
from harness.errors import ConfigError, ProtocolError
from harness.proc import ManagedProcess
from harness.sockets import listen_unix

log = logging.getLogger(__name__)

# net/stream.c: uint32_t len = htonl(size), then the frame.
StreamFrameHeader = struct.Struct(">I")
# IEEE 802.3: destination MAC, source MAC, EtherType.
EthernetHeader = struct.Struct("!6s6sH")
# include/net/net.h: NET_BUFSIZE (4096 + 65536); net_fill_rstate rejects longer frames.
MAX_FRAME = 4096 + 65536
BROADCAST = b"\xff" * 6
# A port's queued bytes beyond which frames to it are dropped (counted).
QUEUE_LIMIT = 2 * 1024 * 1024
_RECV_SIZE = 256 * 1024
CONTROL_NAME = "switch.ctl"


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def encode_frame(frame: bytes) -> bytes:
    """One frame as QEMU's stream netdev sends it."""
    return StreamFrameHeader.pack(len(frame)) + frame


class FrameReader:
    """Cuts a byte stream into frames by their length prefix; keeps partial ones for later.

    Raises ProtocolError when a length says the stream is out of step.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        offset = 0
        size = StreamFrameHeader.size
        while len(self._buffer) - offset >= size:
            (length,) = StreamFrameHeader.unpack_from(self._buffer, offset)
            if length == 0 or length > MAX_FRAME:
                raise ProtocolError(
                    f"frame length {length} is outside 1..{MAX_FRAME} "
                    "(QEMU's NET_BUFSIZE): the stream is out of step"
                )
            if len(self._buffer) - offset - size < length:
                break
            start = offset + size
            frames.append(bytes(self._buffer[start : start + length]))
            offset = start + length
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buffer)


@dataclass
class PortStats:
    """Counters of one port since the switch started (over all its connections)."""

    connects: int = 0
    disconnects: int = 0
    replaced: int = 0  # connections closed because a newer one arrived on the port
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped: int = 0  # frames for this port dropped because its queue was full
    runts: int = 0  # frames from this port shorter than an Ethernet header
    malformed: int = 0  # connections dropped for a bad length
    macs: set[str] = field(default_factory=set)  # source MACs seen on this port

    def to_dict(self, connected: bool) -> dict[str, Any]:
        return {
            "connected": connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "replaced": self.replaced,
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "dropped": self.dropped,
            "runts": self.runts,
            "malformed": self.malformed,
            "macs": sorted(self.macs),
        }


class _Port:
    def __init__(self, name: str, listener: socket.socket) -> None:
        self.name = name
        self.listener = listener
        self.conn: socket.socket | None = None
        self.reader = FrameReader()
        self.queue: deque[memoryview] = deque()
        self.queued = 0
        self.stats = PortStats()


class Switch:
    """The switch's ports and its loop; `SwitchProcess` runs it in a process of its own."""

    def __init__(self, directory: Path, ports: Sequence[str]) -> None:
        if not ports:
            raise ConfigError("a switch needs at least one port")
        if len(set(ports)) != len(ports):
            raise ConfigError(f"port names must differ: {list(ports)}")
        self.directory = Path(directory)
        self._selector = selectors.DefaultSelector()
        self._ports: dict[str, _Port] = {}
        self._macs: dict[bytes, _Port] = {}
        self._lock = threading.Lock()
        self._stopping = False
        # A self-pipe so that stop() from another thread or a signal handler wakes the loop.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            for name in ports:
                listener = listen_unix(self.directory / f"{name}.sock")
                listener.setblocking(False)
                port = _Port(name, listener)
                self._ports[name] = port
                self._selector.register(listener, selectors.EVENT_READ, ("accept", port))
        except BaseException:
            self.close()
            raise

    def socket_path(self, name: str) -> Path:
        return self.directory / f"{name}.sock"

    # -- the loop ----------------------------------------------------------

    def serve(self) -> None:
        """Forward frames until stop()."""
        while not self._stopping:
            for key, events in self._selector.select(timeout=1.0):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(64)
                    continue
                what, port = key.data
                with self._lock:
                    if what == "accept":
                        self._accept(port)
                    elif key.fileobj is port.conn:
                        if events & selectors.EVENT_READ:
                            self._receive(port)
                        if events & selectors.EVENT_WRITE and port.conn is not None:
                            self._flush(port)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        for port in self._ports.values():
            self._disconnect(port, counted=False)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(port.listener)
            port.listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path(port.name).unlink()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self, port: _Port) -> None:
        try:
            conn, _ = port.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        if port.conn is not None:
            # The node's QEMU died and its next boot connected before we saw the EOF:
            # the newest connection is the node now.
            log.info("port %s: a new connection replaces the old one", port.name)
            port.stats.replaced += 1
            self._disconnect(port)
        port.conn = conn
        port.reader = FrameReader()
        port.stats.connects += 1
        self._selector.register(conn, selectors.EVENT_READ, ("conn", port))
        log.info("port %s: connected", port.name)

    def _disconnect(self, port: _Port, counted: bool = True) -> None:
        if port.conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(port.conn)
        port.conn.close()
        port.conn = None
        port.queue.clear()
        port.queued = 0
        for mac in [m for m, p in self._macs.items() if p is port]:
            del self._macs[mac]
        if counted:
            port.stats.disconnects += 1
            log.info("port %s: disconnected", port.name)

    def _receive(self, port: _Port) -> None:
        assert port.conn is not None
        try:
            data = port.conn.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("port %s: %s", port.name, exc)
            self._disconnect(port)
            return
        if not data:
            self._disconnect(port)
            return
        try:
            frames = port.reader.feed(data)
        except ProtocolError as exc:
            log.warning("port %s: %s; dropping the connection", port.name, exc)
            port.stats.malformed += 1
            self._disconnect(port)
            return
        for frame in frames:
            self._forward(port, frame)

    def _forward(self, source: _Port, frame: bytes) -> None:
        source.stats.frames_in += 1
        source.stats.bytes_in += len(frame)
        if len(frame) < EthernetHeader.size:
            source.stats.runts += 1
            return
        dst, src, _ethertype = EthernetHeader.unpack_from(frame)
        if not src[0] & 1:  # a unicast source: learn where it lives
            self._macs[src] = source
            source.stats.macs.add(mac_text(src))
        target = None if dst[0] & 1 else self._macs.get(dst)
        if target is source:
            return  # the destination is on the port it came from
        targets: Iterable[_Port] = (
            (target,)
            if target is not None
            else (p for p in self._ports.values() if p is not source and p.conn is not None)
        )
        wire = encode_frame(frame)
        for port in targets:
            self._send(port, wire)

    def _send(self, port: _Port, wire: bytes) -> None:
        if port.conn is None:
            return
        if port.queued + len(wire) > QUEUE_LIMIT:
            port.stats.dropped += 1
            return
        port.queue.append(memoryview(wire))
        port.queued += len(wire)
        port.stats.frames_out += 1
        port.stats.bytes_out += len(wire) - StreamFrameHeader.size
        if len(port.queue) == 1:
            self._flush(port)

    def _flush(self, port: _Port) -> None:
        assert port.conn is not None
        while port.queue:
            chunk = port.queue[0]
            try:
                sent = port.conn.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("port %s: %s", port.name, exc)
                self._disconnect(port)
                return
            port.queued -= sent
            if sent == len(chunk):
                port.queue.popleft()
            else:
                port.queue[0] = chunk[sent:]
                break
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if port.queue else 0)
        self._selector.modify(port.conn, events, ("conn", port))

    # -- what the control socket answers ------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ports": {
                    name: port.stats.to_dict(port.conn is not None)
                    for name, port in self._ports.items()
                },
                "mac_table": {mac_text(m): p.name for m, p in self._macs.items()},
            }


class SwitchProcess:
    """The switch in a child process: one port per name, `<directory>/<name>.sock`.

    `directory` should be short (a unix socket path has at most 107 bytes) and
    private to the caller; the switch's control socket is `<directory>/switch.ctl`.
    """

    def __init__(
        self, directory: Path | str, ports: Sequence[str], *, log_path: Path | str
    ) -> None:
        self.directory = Path(directory)
        self.ports = tuple(ports)
        if not self.ports:
            raise ConfigError("a switch needs at least one port")
        self.log_path = Path(log_path)
        self.proc: ManagedProcess | None = None

    @property
    def control(self) -> Path:
        return self.directory / CONTROL_NAME

    def socket_path(self, name: str) -> Path:
        if name not in self.ports:
            raise ConfigError(f"the switch has no port {name!r}; it has {', '.join(self.ports)}")
        return self.directory / f"{name}.sock"

    def start(self) -> SwitchProcess:
        if self.proc is not None and self.proc.running:
            raise ConfigError(f"the switch in {self.directory} is already running")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)
        self.proc = ManagedProcess(
            [sys.executable, "-m", "harness.vm.switch", str(self.directory), *self.ports],
            name="switch",
            log_path=self.log_path,
            stop_signal=signal.SIGTERM,
            stop_timeout=5.0,
        )
        self.proc.start()
        # The control socket is bound after every port listens.
        self.proc.wait_for(self.control.exists, 30, f"the switch's control socket {self.control}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def stats(self) -> dict[str, Any]:
        result = control_request(self.control, {"cmd": "stats"})
        assert isinstance(result, dict)
        return result

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        for name in self.ports:
            (self.directory / f"{name}.sock").unlink(missing_ok=True)
        self.control.unlink(missing_ok=True)

    def __enter__(self) -> SwitchProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.vm.switch",
        description="An Ethernet switch between QEMU -netdev stream unix sockets.",
    )
    parser.add_argument("directory", type=Path, help="where the port sockets are made")
    parser.add_argument("ports", nargs="+", help="one port per name: DIRECTORY/NAME.sock")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    switch = Switch(args.directory, args.ports)
    control = ControlServer(args.directory / CONTROL_NAME)
    control.register("stats", lambda _req: switch.stats())

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        switch.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    control.start()
    try:
        switch.serve()
    finally:
        control.close()
        switch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
