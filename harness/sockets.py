"""Sockets the harness listens on: owner-only unix sockets, and the one accept loop.

Every server the harness runs (the vhost-user-blk export, the NBD export,
the control socket) listens through `listen_unix` (or on a socket it was
given) and accepts through `AcceptLoop`, so all three behave alike when the
process runs out of file descriptors: accept(2) fails with EMFILE or ENFILE
while the client waits in the backlog, and a loop that retried at once would
spin a core until a descriptor is freed. The loop backs off instead (50 ms,
doubling to 1 s, reset by the next connection), says so once per spell, and
still stops at once when the server closes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Self

from harness.errors import PowercutError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
# The temporary names a socket is bound under before it listens (listen_unix).
_TEMP_NAMES = itertools.count()
# accept(2) errors that say the listener was shut down or closed: the loop ends.
_CLOSED = frozenset({errno.EBADF, errno.EINVAL})
# Errors that concern one client that left before it was accepted: take the next one.
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM})


def listen_unix(path: str | Path) -> socket.socket:
    """A listening socket at `path`, owner-only; a stale socket file is replaced.

    Refuses a path where something still listens, or that is not a socket.
    """
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    _check_socket_dir(path.parent)
    if path.exists() or path.is_symlink():
        owner = path.lstat().st_uid
        if owner != os.geteuid():
            raise PowercutError(
                f"{path} belongs to uid {owner}, not to this user ({os.geteuid()}); "
                "refusing to replace another user's socket: pass another --socket path"
            )
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise PowercutError(
                f"{path} exists and is not a socket; remove it or pass another --socket path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over from a dead backend
        else:
            raise PowercutError(
                f"socket {path} is in use by a running backend; stop it or pass "
                "another --socket path"
            )
        finally:
            probe.close()
    # Bound under a temporary name and renamed once it listens: a client that waits for the
    # path to appear (QEMU, a session starting a backend) must not find it between bind()
    # and listen(), when a connect is refused.
    tmp = path.with_name(f".{os.getpid()}-{next(_TEMP_NAMES)}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(4)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.umask(old_umask)
    return sock


def _check_socket_dir(directory: Path) -> None:
    """Refuse a directory where another user could swap our socket for theirs.

    A sticky directory (/tmp) is safe: others cannot rename or remove our file
    there, and a file they made first is refused by its owner check.
    """
    st = directory.stat()
    if st.st_mode & stat.S_ISVTX:
        return
    if st.st_uid not in (os.geteuid(), 0):
        raise PowercutError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to this user "
            f"({os.geteuid()}); use a directory of your own (mode 0700)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PowercutError(
            f"socket directory {directory} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); use a directory only you can write (mode 0700)"
        )


class AcceptLoop:
    """Accepts connections on `listener` and hands each to `handle`, until stopped.

    `handle(conn)` runs on the loop's thread: it serves the connection there
    (vhost-user: one frontend at a time) or starts a thread for it (NBD,
    control). If it raises, the error is logged, the connection closed, and
    the loop goes on. Any other failure of accept(2) — out of descriptors
    (EMFILE, ENFILE) or of memory (ENOBUFS, ENOMEM) above all — is retried
    after a pause that doubles from `backoff` up to `max_backoff`. `stop()`
    shuts the listener down, which ends a blocked accept(2) and any pause.
    """

    def __init__(
        self,
        listener: socket.socket,
        handle: Callable[[socket.socket], None],
        *,
        name: str,
        backoff: float = BACKOFF_FIRST,
        max_backoff: float = BACKOFF_MAX,
    ) -> None:
        self.listener = listener
        self.handle = handle
        self.name = name
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.failures = 0  # accept(2) failures that were waited out
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self, thread_name: str | None = None) -> Self:
        """Run the loop on a daemon thread of its own."""
        self._thread = threading.Thread(target=self.run, name=thread_name or self.name, daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Accept until stopped (or the listener is closed under it)."""
        delay = self.backoff
        spell = 0
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in _CLOSED:
                    return
                if exc.errno in _CLIENT_GONE:
                    continue
                self.failures += 1
                spell += 1
                if spell == 1:
                    log.warning(
                        "%s: accept failed: %s; retrying every %.2f-%.1f s until it works",
                        self.name,
                        exc,
                        self.backoff,
                        self.max_backoff,
                    )
                self._stopping.wait(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            if spell:
                log.warning("%s: accepting again after %d failed attempts", self.name, spell)
                spell, delay = 0, self.backoff
            try:
                self.handle(conn)
            except Exception:
                # Whatever one connection did, the next one must still be served.
                log.exception("%s: a connection ended with an internal error", self.name)
                conn.close()

    def stop(self) -> None:
        """Stop accepting: a blocked accept(2) and a pause both end now."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop's thread (not when called from it)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
