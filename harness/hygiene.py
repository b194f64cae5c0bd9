"""What a test session created on the filesystem: temp dirs and unix sockets.

The pytest plugin's session-end check already finds processes and the dirs
its fixtures register; this finds the rest — a `tempfile.mkdtemp` with one of
the harness's prefixes, or a unix socket bound by this process — so that a
helper that forgets its run dir or socket fails the session, not the disk.
Only this process's own creations are seen (other sessions share /tmp).

`processes_naming` is `pgrep -af` read from /proc: a test that asks whether
anything still runs on its socket or directory needs no procps, which a bare
Debian root (debootstrap minbase, a `debian:12` container) does not have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# mkdtemp prefixes the harness uses for its work and run dirs.
PREFIXES = ("powercut", "pc-")

_created: list[Path] = []
_lock = threading.Lock()
_installed = False


def _record(path: Path) -> None:
    with _lock:
        _created.append(path)


def _wrap_mkdtemp(original: Callable[..., Any]) -> Callable[..., Any]:
    def mkdtemp(*args: Any, **kwargs: Any) -> Any:
        path = original(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else None)
        if isinstance(prefix, str) and prefix.startswith(PREFIXES):
            _record(Path(os.fsdecode(path)).absolute())
        return path

    return mkdtemp


def _wrap_bind(original: Callable[..., Any]) -> Callable[..., Any]:
    def bind(self: socket.socket, address: Any) -> Any:
        result = original(self, address)
        if self.family == socket.AF_UNIX and isinstance(address, str | bytes | os.PathLike):
            name = os.fsdecode(address)
            if name and not name.startswith("\0"):  # not an abstract socket
                _record(Path(name).absolute())
        return result

    return bind


def watch() -> int:
    """Start recording (once per process); returns a mark for `leftovers`."""
    global _installed
    with _lock:
        if not _installed:
            tempfile.mkdtemp = _wrap_mkdtemp(tempfile.mkdtemp)
            socket.socket.bind = _wrap_bind(socket.socket.bind)  # type: ignore[method-assign]
            _installed = True
        return len(_created)


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def leftovers(mark: int, exclude: Iterable[Path] = ()) -> list[Path]:
    """Dirs and sockets recorded since `mark` that still exist, outside `exclude`."""
    roots = [Path(p).absolute() for p in exclude]
    with _lock:
        recorded = list(dict.fromkeys(_created[mark:]))
    found = []
    for path in recorded:
        if any(path == root or root in path.parents for root in roots):
            continue
        if (path.is_dir() and not path.is_symlink()) or is_socket(path):
            found.append(path)
    return found


def processes_naming(text: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains `text`.

    The arguments are joined by spaces, as `pgrep -f` matches them; the caller
    is left out, and so are zombies (their command line is empty). What
    `pgrep -af TEXT` prints, without depending on procps.
    """
    needle = os.fsencode(text)
    found = []
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        line = raw.rstrip(b"\0").replace(b"\0", b" ")  # as pgrep -f matches it
        if needle in line:
            found.append((pid, os.fsdecode(line)))
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
