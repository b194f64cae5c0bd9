"""The NBD server: one listening socket, named exports, each client on its own thread.

`NbdServer` accepts clients in turn and at the same time (each connection has
a thread; the exports' BlockBackends are thread-safe), negotiates with each
(harness.nbd.negotiation) and serves the export it chose
(harness.nbd.transmission). Whatever one client does — malformed options,
bad requests, dying mid-request — ends at most its own connection; the
listener and the other clients carry on. The images and BlockBackends belong
to the caller and outlive every connection; `close()` stops accepting, ends
the connections after the requests they are running, and leaves the
backends open.

The handshake is bounded in time (QEMU's handshake-max-seconds, default
10 s), so a client that connects and says nothing holds no thread for long.

    from harness.block import open_backend
    from harness.nbd import NbdExport, NbdServer

    backend = open_backend("driver=raw,file.driver=file,file.filename=disk.img")
    server = NbdServer(listener, [NbdExport("disk", backend, writable=True)]).start()
    # qemu-io -f raw 'nbd+unix:///disk?socket=PATH'
    server.close(); backend.close()

An export asked for by the empty name is the only export, when there is
exactly one (a convenience QEMU's server does not offer: `nbd+unix://?socket=S`
then works too).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, NbdProtocolError
from harness.nbd.channel import Channel, ClientGone
from harness.nbd.export import NbdExport
from harness.nbd.negotiation import negotiate
from harness.nbd.protocol import NbdCmd
from harness.nbd.transmission import Transmission
from harness.sockets import AcceptLoop

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


class NbdServer:
    """NBD exports on one listening socket (unix, TCP, or an inherited one)."""

    def __init__(
        self,
        listener: socket.socket,
        exports: Iterable[NbdExport] = (),
        *,
        name: str = "nbd",
        path: str | Path | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections: int = 0,
        parallel_io: bool | None = None,
    ) -> None:
        """`path`: a unix socket file to remove on close. `max_connections`: 0 is no
        limit. `parallel_io`: overlap large requests on helper threads; by default
        only for exports whose graph uses O_DIRECT (see harness.nbd.transmission)."""
        self.listener = listener
        self.name = name
        self.path = Path(path) if path is not None else None
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.parallel_io = parallel_io
        self._exports: dict[str, NbdExport] = {}
        for export in exports:
            self.add_export(export)
        self._lock = threading.Lock()
        self._clients: dict[int, Channel] = {}
        self._transmissions: dict[int, Transmission] = {}
        self._threads: set[threading.Thread] = set()
        self._next_id = 0
        self._closing = False
        self._accept = AcceptLoop(listener, self._connected, name=name)
        self._finished_counts = [0] * 10
        self.connections = 0
        self.dropped = 0  # connections ended by a protocol violation
        self.refused = 0  # connections over max_connections
        self.request_errors = 0
        self.started_at = time.monotonic()

    # -- exports -----------------------------------------------------------------

    def add_export(self, export: NbdExport) -> None:
        if export.name in self._exports:
            raise ConfigError(f"two NBD exports are named {export.name!r}; give each its own name")
        self._exports[export.name] = export

    def remove_export(self, name: str) -> None:
        """Stop offering `name` to new clients (connected ones keep it until they leave)."""
        self._exports.pop(name, None)

    @property
    def exports(self) -> list[NbdExport]:
        return list(self._exports.values())

    def find(self, name: str) -> NbdExport | None:
        export = self._exports.get(name)
        if export is None and name == "" and len(self._exports) == 1:
            export = next(iter(self._exports.values()))
        return export

    # -- serving -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where clients connect: a unix socket path or HOST:PORT."""
        addr = self.listener.getsockname()
        if isinstance(addr, tuple):
            return f"{addr[0]}:{addr[1]}"
        return str(addr)

    def start(self) -> NbdServer:
        self.listener.listen(16)
        self._accept.start(f"nbd-{self.name}")
        return self

    def _connected(self, conn: socket.socket) -> None:
        """A new client: its own thread, unless the server is closing or full."""
        with self._lock:
            if self._closing:
                conn.close()
                return
            if self.max_connections and len(self._clients) >= self.max_connections:
                self.refused += 1
                log.warning(
                    "%s: refusing a client: %d connections open (max-connections=%d)",
                    self.name,
                    len(self._clients),
                    self.max_connections,
                )
                conn.close()
                return
            self._next_id += 1
            cid = self._next_id
            self.connections += 1
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # Replies are small and often back to back: no Nagle delay (as QEMU).
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = Channel(conn, f"client {cid}{_peer_suffix(conn)}")
            self._clients[cid] = channel
            thread = threading.Thread(
                target=self._client,
                args=(cid, channel),
                name=f"nbd-{self.name}-client{cid}",
                daemon=True,
            )
            self._threads.add(thread)
        thread.start()

    def _client(self, cid: int, channel: Channel) -> None:
        transmission: Transmission | None = None
        try:
            channel.set_timeout(self.handshake_timeout or None)
            result = negotiate(channel, self.find, lambda: self.exports)
            if result is None:
                log.info("%s: %s aborted the negotiation", self.name, channel.peer)
                return
            channel.set_timeout(None)
            export = result.export
            log.info(
                "%s: %s connected to export %r (%d bytes%s)",
                self.name,
                channel.peer,
                export.name,
                export.size,
                ", read-only" if export.read_only else "",
            )
            transmission = Transmission(channel, export, parallel=self._parallel(export))
            with self._lock:
                self._transmissions[cid] = transmission
            transmission.run()
            log.info("%s: %s disconnected", self.name, channel.peer)
        except ClientGone as exc:
            log.info("%s: %s went away: %s", self.name, channel.peer, exc)
        except NbdProtocolError as exc:
            with self._lock:
                self.dropped += 1
            log.warning("%s: dropping %s: %s", self.name, channel.peer, exc)
        except Exception:
            # A bug, met by one client: it must not take the server or the others down.
            with self._lock:
                self.dropped += 1
            log.exception(
                "%s: %s: internal error; dropping the connection", self.name, channel.peer
            )
        finally:
            channel.close()
            with self._lock:
                self._clients.pop(cid, None)
                self._transmissions.pop(cid, None)
                self._threads.discard(threading.current_thread())
                if transmission is not None:
                    for i, n in enumerate(transmission.counts):
                        self._finished_counts[i] += n
                    self.request_errors += transmission.errors

    def _parallel(self, export: NbdExport) -> bool:
        if self.parallel_io is not None:
            return self.parallel_io
        return bool(getattr(getattr(export.backend.root, "open_flags", None), "direct", False))

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, end every connection (after its running request), join threads."""
        with self._lock:
            self._closing = True
            clients = list(self._clients.values())
            threads = list(self._threads)
        self._accept.stop()
        self.listener.close()
        for channel in clients:
            channel.shutdown()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._accept.join(max(0.0, deadline - time.monotonic()))
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- observability -------------------------------------------------------------

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._clients)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = list(self._finished_counts)
            errors = self.request_errors
            for live in self._transmissions.values():
                counts = [a + b for a, b in zip(counts, live.counts, strict=True)]
                errors += live.errors
            active = len(self._clients)
        names = {int(c): c.name for c in NbdCmd}
        return {
            "address": self.address if not self._closing else None,
            "exports": [
                {
                    "name": e.name,
                    "size": e.size,
                    "writable": e.writable,
                    "flags": e.transmission_flags,
                }
                for e in self._exports.values()
            ],
            "connections": self.connections,
            "active": active,
            "dropped": self.dropped,
            "refused": self.refused,
            "requests": {names.get(i, "unknown"): n for i, n in enumerate(counts) if n},
            "request_errors": errors,
        }


def _peer_suffix(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return ""
    return f" ({peer[0]}:{peer[1]})" if isinstance(peer, tuple) else ""
