"""Unix sockets the harness listens on: owner-only, never stealing a live one.

Every server the harness runs (the vhost-user-blk export, the NBD export,
the control socket) listens through `listen_unix`.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from harness.errors import PowercutError


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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(4)
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
