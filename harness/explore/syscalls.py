"""A workload's file system calls: the model, and strace's output parsed as it streams in.

The model is what the explanation needs (harness/explore/causes.py): one
`Call` per system call with its kind, process, the paths it resolves to, the
descriptor, flags, offset and length, the result, and its enter and exit
times on the tracer's guest clock (`harness.explore.clock` maps them to the
host's CLOCK_MONOTONIC, the clock of the write log and of the
acknowledgements). Two mechanisms produce it (docs/tracing.md has the
measurements): the kernel's syscall tracepoints (`harness.guest.tracefs`,
the default), whose events are turned into the lines strace would print,
and strace itself (`strace_command`: `-f` follows the whole tree from its
first instruction, `--seccomp-bpf` stops only the calls asked for, `-y`
prints the path behind every descriptor and behind `AT_FDCWD`).

The parser (`StraceParser`) takes the output as it arrives, in pieces: a
line is parsed when its newline arrives, and a last line without one (the
power was cut while it was written) is dropped and counted in `truncated`.
Calls interrupted by another process's output (`<unfinished ...>`, then
`<... NAME resumed>`) are joined; a call that never resumed keeps
`exit_ns=None`. Paths come from strace's `<...>` annotations when it printed
them; otherwise (tracepoints, or strace without `-y`) from the parser's own
descriptor table, working directory and shared mappings per process,
inherited at `clone`, close-on-exec descriptors dropped at `execve`; a path
it cannot resolve stays relative rather than guessed.

This module imports nothing but the standard library: the explanation engine
(in `harness.explore`) and the guest side both read it.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

# What is traced: every call that changes a file, a directory entry or what is
# durable, and the calls the parser needs to follow descriptors, mappings and
# working directories (clone, execve, dup, chdir, mmap).
FILE_CALLS = (
    "open", "openat", "openat2", "creat",
    "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "truncate", "ftruncate", "fallocate",
    "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat",
    "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir",
    "fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "msync",
    "close", "lseek",
)  # fmt: skip
# The process tree and the working directory: few calls per process.
TRACKING_CALLS = ("chdir", "fchdir", "clone", "clone3", "fork", "vfork", "execve", "execveat")
# Not traced by default, each stop costing milliseconds under TCG: mmap (the only way to
# name the file an msync syncs; the dynamic loader makes five per library), fcntl (SQLite
# takes its locks with it, ten per transaction) and dup* (-y names the file behind every
# descriptor anyway). The parser understands them when a trace has them.
OPTIONAL_CALLS = ("mmap", "dup", "dup2", "dup3", "fcntl")
TRACED = FILE_CALLS + TRACKING_CALLS

STRACE = "strace"
# -y: the path behind every descriptor and AT_FDCWD (-yy would add a netlink query per
# socket); -X raw: flags as numbers (parsed here, not strace's spelling); -s 64: enough of a
# write's data to see an acknowledgement line; -q: no attach messages, but exits stay.
STRACE_OPTIONS = (
    "-f", "-q", "-y", "-X", "raw", "-s", "64", "-T",
    "--seccomp-bpf", "--timestamps=unix,ns",
)  # fmt: skip

AT_FDCWD = -100

# <fcntl.h> on x86_64 (the guest is always x86_64).
O_ACCMODE = 0o3
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_DSYNC = 0o10000
O_DIRECT = 0o40000
O_DIRECTORY = 0o200000
O_CLOEXEC = 0o2000000
__O_SYNC = 0o4000000
O_SYNC = __O_SYNC | O_DSYNC
O_TMPFILE = 0o20000000 | O_DIRECTORY
MAP_SHARED = 0x1
CLONE_THREAD = 0x10000
F_DUPFD = 0
F_DUPFD_CLOEXEC = 1030
RENAME_EXCHANGE = 0x2
AT_REMOVEDIR = 0x200

_FLAG_NAMES = (
    (O_CREAT, "O_CREAT"),
    (O_EXCL, "O_EXCL"),
    (O_TRUNC, "O_TRUNC"),
    (O_APPEND, "O_APPEND"),
    (O_DIRECT, "O_DIRECT"),
    (O_DIRECTORY, "O_DIRECTORY"),
)


def open_flag_names(flags: int) -> str:
    """O_WRONLY|O_CREAT|O_SYNC, as a person writes them (the access mode first)."""
    names = [("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & O_ACCMODE]]
    if flags & O_TMPFILE == O_TMPFILE:
        names.append("O_TMPFILE")
        flags &= ~O_TMPFILE
    if flags & O_SYNC == O_SYNC:
        names.append("O_SYNC")
    elif flags & O_DSYNC:
        names.append("O_DSYNC")
    names += [name for bit, name in _FLAG_NAMES if flags & bit]
    return "|".join(names)


class CallKind(enum.Enum):
    """What a call does to files, whichever of its system call variants it was."""

    OPEN = "open"  # open, openat, openat2, creat
    WRITE = "write"  # write, pwrite64, writev, pwritev, pwritev2
    TRUNCATE = "truncate"  # truncate, ftruncate
    FALLOCATE = "fallocate"
    RENAME = "rename"  # rename, renameat, renameat2
    LINK = "link"  # link, linkat
    SYMLINK = "symlink"  # symlink, symlinkat
    UNLINK = "unlink"  # unlink, unlinkat without AT_REMOVEDIR
    MKDIR = "mkdir"  # mkdir, mkdirat
    RMDIR = "rmdir"  # rmdir, unlinkat with AT_REMOVEDIR
    FSYNC = "fsync"
    FDATASYNC = "fdatasync"
    SYNC = "sync"
    SYNCFS = "syncfs"
    SYNC_FILE_RANGE = "sync_file_range"
    MSYNC = "msync"
    CLOSE = "close"
    SEEK = "lseek"  # where the next write() of the descriptor goes (the result)
    MMAP = "mmap"
    DUP = "dup"  # dup, dup2, dup3, fcntl(F_DUPFD)
    CHDIR = "chdir"  # chdir, fchdir
    CLONE = "clone"  # clone, clone3, fork, vfork
    EXEC = "exec"  # execve, execveat
    OTHER = "other"  # a call of no interest here (fcntl without F_DUPFD)

    @property
    def changes_entries(self) -> bool:
        """Whether the call creates, removes or renames a directory entry."""
        return self in _ENTRY_KINDS

    @property
    def syncs(self) -> bool:
        return self in _SYNC_KINDS


_ENTRY_KINDS = frozenset(
    {CallKind.RENAME, CallKind.LINK, CallKind.SYMLINK, CallKind.UNLINK, CallKind.MKDIR}
    | {CallKind.RMDIR}
)
_SYNC_KINDS = frozenset(
    {CallKind.FSYNC, CallKind.FDATASYNC, CallKind.SYNC, CallKind.SYNCFS}
    | {CallKind.SYNC_FILE_RANGE, CallKind.MSYNC}
)

KIND_OF: dict[str, CallKind] = {
    **dict.fromkeys(("open", "openat", "openat2", "creat"), CallKind.OPEN),
    **dict.fromkeys(("write", "pwrite64", "writev", "pwritev", "pwritev2"), CallKind.WRITE),
    **dict.fromkeys(("truncate", "ftruncate"), CallKind.TRUNCATE),
    "fallocate": CallKind.FALLOCATE,
    **dict.fromkeys(("rename", "renameat", "renameat2"), CallKind.RENAME),
    **dict.fromkeys(("link", "linkat"), CallKind.LINK),
    **dict.fromkeys(("symlink", "symlinkat"), CallKind.SYMLINK),
    **dict.fromkeys(("unlink", "unlinkat"), CallKind.UNLINK),
    **dict.fromkeys(("mkdir", "mkdirat"), CallKind.MKDIR),
    "rmdir": CallKind.RMDIR,
    "fsync": CallKind.FSYNC,
    "fdatasync": CallKind.FDATASYNC,
    "sync": CallKind.SYNC,
    "syncfs": CallKind.SYNCFS,
    "sync_file_range": CallKind.SYNC_FILE_RANGE,
    "msync": CallKind.MSYNC,
    "close": CallKind.CLOSE,
    "lseek": CallKind.SEEK,
    "mmap": CallKind.MMAP,
    **dict.fromkeys(("dup", "dup2", "dup3"), CallKind.DUP),
    "fcntl": CallKind.OTHER,
    **dict.fromkeys(("chdir", "fchdir"), CallKind.CHDIR),
    **dict.fromkeys(("clone", "clone3", "fork", "vfork"), CallKind.CLONE),
    **dict.fromkeys(("execve", "execveat"), CallKind.EXEC),
}


@dataclass(frozen=True)
class Call:
    """One system call of the workload's tree, as far as the trace shows it.

    `path` is the file or directory the call acts on (the source of a rename
    or link), `path2` the second one (the target); both absolute when the
    trace or the parser knew the directory, relative otherwise. `fd` is the
    descriptor argument, or for an open the descriptor it returned. `length`
    is the byte count asked for (writes, ranges), or the new size of a
    truncate. `result` is None for a call still running when the trace ended.
    Times are ns on the guest's clock (CLOCK_REALTIME).
    """

    index: int  # position in the trace, by enter time
    pid: int
    name: str  # the system call as traced: "renameat2"
    kind: CallKind
    enter_ns: int
    exit_ns: int | None = None
    path: str | None = None
    path2: str | None = None
    fd: int | None = None
    flags: int | None = None
    offset: int | None = None
    length: int | None = None
    result: int | None = None
    errno: str | None = None
    data: bytes | None = None  # the start of what a write wrote (strace -s)

    @property
    def finished(self) -> bool:
        return self.exit_ns is not None

    @property
    def ok(self) -> bool:
        """The call returned and did not fail."""
        return self.exit_ns is not None and self.errno is None and self.result is not None

    @property
    def synchronous(self) -> bool:
        """An open with O_SYNC or O_DSYNC (each write through it is durable when it returns)."""
        return self.kind is CallKind.OPEN and bool((self.flags or 0) & O_DSYNC)

    def describe(self) -> str:
        """The call as a person writes it: `rename(/mnt/x.tmp, /mnt/x)`."""
        if self.kind is CallKind.OPEN:
            flags = open_flag_names(self.flags or 0)
            return f"{self.name}({self.path or '?'}, {flags})"
        if self.kind is CallKind.WRITE:
            where = f", offset {self.offset}" if self.offset is not None else ""
            return f"{self.name}({self.path or f'fd {self.fd}'}, {self.length} bytes{where})"
        args = [a for a in (self.path, self.path2) if a is not None]
        if not args and self.fd is not None:
            args.append(f"fd {self.fd}")
        if self.kind is CallKind.TRUNCATE and self.length is not None:
            args.append(str(self.length))
        return f"{self.name}({', '.join(args)})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "pid": self.pid,
            "name": self.name,
            "kind": self.kind.value,
            "enter_ns": self.enter_ns,
            "exit_ns": self.exit_ns,
        }
        for key in ("path", "path2", "fd", "flags", "offset", "length", "result", "errno"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.data is not None:
            out["data"] = self.data.decode("latin-1")
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Call:
        data = raw.get("data")
        return cls(
            index=int(raw["index"]),
            pid=int(raw["pid"]),
            name=str(raw["name"]),
            kind=CallKind(raw["kind"]),
            enter_ns=int(raw["enter_ns"]),
            exit_ns=None if raw.get("exit_ns") is None else int(raw["exit_ns"]),
            path=raw.get("path"),
            path2=raw.get("path2"),
            fd=raw.get("fd"),
            flags=raw.get("flags"),
            offset=raw.get("offset"),
            length=raw.get("length"),
            result=raw.get("result"),
            errno=raw.get("errno"),
            data=None if data is None else str(data).encode("latin-1"),
        )


@dataclass(frozen=True)
class Process:
    """A process of the traced tree: who started it, what it ran, how it ended."""

    pid: int
    parent: int | None = None
    argv: tuple[str, ...] = ()
    exit_code: int | None = None  # `+++ exited with N +++`
    killed_by: str | None = None  # `+++ killed by SIGKILL +++`


@dataclass(frozen=True)
class Signal:
    """A signal delivered to a traced process (`--- SIGTERM {...} ---`)."""

    pid: int
    time_ns: int
    name: str


@dataclass(frozen=True)
class Trace:
    """A parsed trace: the calls in enter order, the processes, the signals."""

    calls: tuple[Call, ...] = ()
    processes: tuple[Process, ...] = ()
    signals: tuple[Signal, ...] = ()
    truncated: int = 0  # a last line the cut left without its newline (dropped)
    unparsed: tuple[str, ...] = ()  # whole lines that are not strace's (first few kept)
    unparsed_count: int = 0

    @property
    def last_ns(self) -> int | None:
        """The latest time the trace saw: everything before it is in the trace."""
        times = [c.exit_ns or c.enter_ns for c in self.calls]
        times += [s.time_ns for s in self.signals]
        return max(times) if times else None

    def of_kind(self, *kinds: CallKind) -> list[Call]:
        return [c for c in self.calls if c.kind in kinds]

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": [c.to_json() for c in self.calls],
            "processes": [
                {
                    "pid": p.pid,
                    "parent": p.parent,
                    "argv": list(p.argv),
                    "exit_code": p.exit_code,
                    "killed_by": p.killed_by,
                }
                for p in self.processes
            ],
            "signals": [{"pid": s.pid, "time_ns": s.time_ns, "name": s.name} for s in self.signals],
            "truncated": self.truncated,
            "unparsed": list(self.unparsed),
            "unparsed_count": self.unparsed_count,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Trace:
        return cls(
            calls=tuple(Call.from_json(c) for c in raw.get("calls", [])),
            processes=tuple(
                Process(
                    int(p["pid"]),
                    p.get("parent"),
                    tuple(p.get("argv", ())),
                    p.get("exit_code"),
                    p.get("killed_by"),
                )
                for p in raw.get("processes", [])
            ),
            signals=tuple(
                Signal(int(s["pid"]), int(s["time_ns"]), str(s["name"]))
                for s in raw.get("signals", [])
            ),
            truncated=int(raw.get("truncated", 0)),
            unparsed=tuple(raw.get("unparsed", ())),
            unparsed_count=int(raw.get("unparsed_count", 0)),
        )


# -- the command that traces a workload ----------------------------------------------


def strace_command(
    command: str, output: str, *, strace: str = STRACE, calls: Iterable[str] = TRACED
) -> str:
    """A /bin/sh command that runs `command` (a /bin/sh command) with its whole tree traced.

    The trace goes to `output` (a file, or a FIFO another channel reads as it
    fills); the command's own stdin, stdout, stderr and exit status are its
    own (strace exits with the traced command's status, and is killed by the
    signal that killed it).
    """
    options = " ".join(STRACE_OPTIONS)
    names = ",".join(calls)
    return f"exec {strace} {options} -e trace={names} -o {_quote(output)} sh -c {_quote(command)}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- strace's output --------------------------------------------------------------------

_LINE = re.compile(r"(\d+)\s+(\d+)\.(\d{1,9})\s+(.*)")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)")
_CALL = re.compile(r"(\w+)\((.*)")
_SIGNAL = re.compile(r"--- (SIG\w+|\d+) .*---")
_EXITED = re.compile(r"\+\+\+ exited with (\d+) \+\+\+")
_KILLED = re.compile(r"\+\+\+ killed by (SIG\w+)(?: \(core dumped\))? \+\+\+")
_RETURN_TAIL = re.compile(
    r"(?:\s+(?P<errno>E[A-Z0-9_]+))?(?:\s+\([^)]*\))*\s*(?:<(?P<dur>\d+\.\d+)>)?\s*"
)
_RETURN_VALUE = re.compile(r"\s*=\s*(\?|0x[0-9a-fA-F]+|-?\d+)")
_FD = re.compile(r"(-?\d+)(?:<(.*)>)?", re.DOTALL)
_NUMBER = re.compile(r"-?(?:0x[0-9a-fA-F]+|0[0-7]*|[1-9]\d*)")
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34}
UNPARSED_KEPT = 20


def _time_ns(seconds: str, fraction: str) -> int:
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0"))


def unescape(text: str) -> bytes:
    """strace's C escapes (`\\n`, `\\"`, `\\303`, `\\x41`) back to the bytes they stand for."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "\\" or i + 1 == n:
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in "01234567":
            j = i + 1
            while j < n and j < i + 4 and text[j] in "01234567":
                j += 1
            out.append(int(text[i + 1 : j], 8) & 0xFF)
            i = j
        elif nxt == "x" and i + 3 < n + 1 and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(_ESCAPES.get(nxt, ord(nxt) if ord(nxt) < 128 else 63))
            i += 2
    return bytes(out)


def _decode_path(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def split_args(text: str) -> tuple[list[str], str]:
    """Split `a, "b,)", [c, d], 3</x>) = 0` at its top-level commas, up to the closing paren.

    Returns the arguments and what follows the closing parenthesis (empty and
    no closing parenthesis: the line stopped inside the arguments, as an
    `<unfinished ...>` line does).
    """
    args: list[str] = []
    depth = 0
    start = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if ch == "<" and i > 0 and (text[i - 1].isdigit() or text[i - 1] == "0"):
            # A descriptor's annotation; a device's nests one more (`</dev/null<char 1:3>>`).
            level = 0
            while i < n:
                if text[i] == "<":
                    level += 1
                elif text[i] == ">":
                    level -= 1
                    if level == 0:
                        break
                i += 1
            i += 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0 and ch == ")":
                piece = text[start:i].strip()
                if piece or args:
                    args.append(piece)
                return args, text[i + 1 :]
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    piece = text[start:].strip()
    if piece:
        args.append(piece)
    return args, ""


def _string(arg: str | None) -> bytes | None:
    """A quoted argument's bytes (a truncated one: what was shown); None if it is not a string."""
    if arg is None or not arg.startswith('"'):
        return None
    end = arg.rfind('"')
    if end <= 0:
        return unescape(arg[1:])
    return unescape(arg[1:end])


def _int(arg: str | None) -> int | None:
    if arg is None:
        return None
    m = _NUMBER.match(arg.strip())
    if m is None:
        return None
    return int(m.group(0), 0) if not re.fullmatch(r"-?0[0-7]+", m.group(0)) else int(m.group(0), 8)


def _fd(arg: str | None) -> tuple[int | None, str | None]:
    """A descriptor argument: its number and, if strace annotated it, the path behind it."""
    if arg is None:
        return None, None
    m = _FD.fullmatch(arg.strip())
    if m is None:
        return None, None
    number = int(m.group(1))
    ann = m.group(2)
    if ann is None:
        return number, None
    if "<" in ann and ann.endswith(">") and ann.startswith("/"):
        ann = ann[: ann.index("<")]  # a device: /dev/null<char 1:3>
    if not ann.startswith("/"):
        return number, None  # pipe:[...], socket:[...], anon_inode:...
    path = _decode_path(unescape(ann))
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return number, path


def _field(arg: str | None, name: str) -> str | None:
    """`flags=0x241` out of a structure argument `{flags=0x241, mode=0644, resolve=0}`."""
    if arg is None:
        return None
    m = re.search(rf"\b{name}=([^,}}]+)", arg)
    return m.group(1) if m else None


@dataclass(frozen=True)
class _Return:
    value: str  # "?", a number
    annotation: str | None  # what strace printed in <...> after it (a path, a pipe)
    errno: str | None
    duration: str | None


def _parse_return(after: str) -> _Return | None:
    """` = 3</mnt/x> <0.000012>`, ` = -1 ENOENT (No such file or directory) <0.0001>`, ` = ?`."""
    m = _RETURN_VALUE.match(after)
    if m is None:
        return None
    i = m.end()
    annotation = None
    if after[i : i + 1] == "<":
        level, j = 0, i
        while j < len(after):
            if after[j] == "<":
                level += 1
            elif after[j] == ">":
                level -= 1
                if level == 0:
                    break
            j += 1
        annotation, i = after[i + 1 : j], j + 1
    tail = _RETURN_TAIL.fullmatch(after[i:])
    if tail is None:
        return None
    return _Return(m.group(1), annotation, tail.group("errno"), tail.group("dur"))


@dataclass
class _ProcState:
    cwd: str | None = None
    fds: dict[int, tuple[str, int]] = field(default_factory=dict)  # fd -> (path, open flags)
    maps: list[tuple[int, int, str]] = field(default_factory=list)  # shared file mappings


@dataclass
class _Pending:
    name: str
    enter_ns: int
    args: str
    line: int


class LineFed:
    """Text that arrives in chunks of any size, handed on a whole line at a time."""

    _partial = b""  # the last line, until its newline arrives

    def feed(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        buf = self._partial + data
        *complete, self._partial = buf.split(b"\n")
        for raw in complete:
            self.line(raw.decode("utf-8", "surrogateescape"))

    def line(self, text: str) -> None:
        raise NotImplementedError


class StraceParser(LineFed):
    """Feeds on strace output as it arrives (any chunks); `trace()` is what it made of it."""

    def __init__(self, initial_cwd: str | None = None) -> None:
        self.initial_cwd = initial_cwd  # of a process whose parent the trace does not show
        self._lines = 0
        self._calls: list[tuple[int, int, Call]] = []  # (enter_ns, line, call)
        self._procs: dict[int, _ProcState] = {}
        self._info: dict[int, Process] = {}
        self._pending: dict[int, _Pending] = {}
        self._signals: list[Signal] = []
        self._unparsed: list[str] = []
        self._unparsed_count = 0

    # -- input --------------------------------------------------------------------------

    def feed_lines(self, lines: Iterable[str]) -> None:
        for text in lines:
            self.line(text)

    def line(self, text: str) -> None:
        """One whole line of strace's output (its newline arrived)."""
        self._lines += 1
        text = text.rstrip("\r")
        if not text.strip():
            return
        m = _LINE.fullmatch(text)
        if m is None:
            self._unparsable(text)
            return
        pid, now, rest = int(m.group(1)), _time_ns(m.group(2), m.group(3)), m.group(4)
        self._proc(pid)
        if rest.startswith("---"):
            sig = _SIGNAL.fullmatch(rest)
            if sig:
                self._signals.append(Signal(pid, now, sig.group(1)))
            else:
                self._unparsable(text)
            return
        if rest.startswith("+++"):
            self._exit(pid, rest, text)
            return
        resumed = _RESUMED.fullmatch(rest)
        if resumed:
            name, tail = resumed.group(1), resumed.group(2)
            pending = self._pending.pop(pid, None)
            if pending is not None and pending.name == name:
                joined = pending.args + (", " if pending.args.strip() and tail[:1] != ")" else "")
                self._complete(pid, name, pending.enter_ns, joined + tail, pending.line)
            else:
                # Resumed without its start: a child's half of clone/fork, or a call in
                # flight when strace attached. Its arguments are gone; its result is not.
                _lost, after = split_args(tail)
                self._complete(pid, name, now, ")" + after, self._lines)
            return
        call = _CALL.fullmatch(rest)
        if call is None:
            self._unparsable(text)
            return
        name, tail = call.group(1), call.group(2)
        if tail.endswith("<unfinished ...>"):
            self._pending[pid] = _Pending(
                name, now, tail[: -len("<unfinished ...>")].rstrip().rstrip(","), self._lines
            )
            return
        self._complete(pid, name, now, tail, self._lines)

    def _unparsable(self, text: str) -> None:
        self._unparsed_count += 1
        if len(self._unparsed) < UNPARSED_KEPT:
            self._unparsed.append(text[:200])

    def _proc(self, pid: int) -> _ProcState:
        state = self._procs.get(pid)
        if state is None:
            state = self._procs[pid] = _ProcState(self.initial_cwd)
            self._info.setdefault(pid, Process(pid))
        return state

    def _exit(self, pid: int, rest: str, text: str) -> None:
        info = self._info.get(pid, Process(pid))
        if m := _EXITED.fullmatch(rest):
            self._info[pid] = replace(info, exit_code=int(m.group(1)))
        elif m := _KILLED.fullmatch(rest):
            self._info[pid] = replace(info, killed_by=m.group(1))
        else:
            self._unparsable(text)

    # -- one call -----------------------------------------------------------------------

    def _complete(self, pid: int, name: str, enter: int, tail: str, line: int) -> None:
        args, after = split_args(tail)
        ret = _parse_return(after)
        if ret is None:
            self._unparsable(f"{pid} {name}({tail}")
            return
        result = None if ret.value == "?" else int(ret.value, 0)
        exit_ns: int | None = enter + round(float(ret.duration) * 1e9) if ret.duration else enter
        if ret.value == "?" and ret.errno is None:
            exit_ns = None  # the process died in the call
        if ret.errno is not None and ret.errno.startswith("ERESTART"):
            exit_ns = None  # interrupted by a signal; a restart is a call of its own
        ann_path = None
        if ret.annotation is not None:
            ann_path = _fd(f"{ret.value}<{ret.annotation}>")[1]
        call = Call(
            index=0,
            pid=pid,
            name=name,
            kind=KIND_OF.get(name, CallKind.OTHER),
            enter_ns=enter,
            exit_ns=exit_ns,
            result=result if ret.errno is None else -1,
            errno=ret.errno,
        )
        interpreted = self._interpret(call, args, ann_path)
        if interpreted is not None:
            self._calls.append((enter, line, interpreted))

    def _resolve(self, pid: int, path: bytes | None, dirfd: str | None = None) -> str | None:
        """A path argument made absolute: against its dirfd, else the process's cwd."""
        if path is None:
            return None
        text = _decode_path(path)
        state = self._proc(pid)
        base: str | None = state.cwd
        if dirfd is not None:
            number, ann = _fd(dirfd)
            if number == AT_FDCWD and ann is not None:
                state.cwd = ann  # strace showed the cwd: learn it for calls that do not
            if number != AT_FDCWD:
                base = ann if ann is not None else self._fd_path(pid, number)
            elif ann is not None:
                base = ann
        if text.startswith("/"):
            return posixpath.normpath(text)
        if base is None:
            return text
        return posixpath.normpath(posixpath.join(base, text)) if text else base

    def _fd_path(self, pid: int, fd: int | None) -> str | None:
        if fd is None:
            return None
        entry = self._proc(pid).fds.get(fd)
        return entry[0] if entry else None

    def _fd_arg(self, pid: int, arg: str | None) -> tuple[int | None, str | None]:
        number, path = _fd(arg)
        if path is None:
            path = self._fd_path(pid, number)
        return number, path

    def _interpret(self, call: Call, args: list[str], ann: str | None) -> Call | None:
        """Fill in what the arguments say, and keep the per-process tables true."""
        pid, name, kind = call.pid, call.name, call.kind
        state = self._proc(pid)

        def arg(i: int) -> str | None:
            return args[i] if i < len(args) else None

        ok = call.errno is None and call.result is not None
        if kind is CallKind.OPEN:
            if name == "openat2":
                dirfd, path, flags = arg(0), arg(1), _int(_field(arg(2), "flags"))
            elif name == "openat":
                dirfd, path, flags = arg(0), arg(1), _int(arg(2))
            elif name == "creat":
                dirfd, path, flags = None, arg(0), O_CREAT | O_WRONLY | O_TRUNC
            else:
                dirfd, path, flags = None, arg(0), _int(arg(1))
            joined = self._resolve(pid, _string(path), dirfd)  # learns the cwd, too
            resolved = ann or joined
            fd = call.result if ok else None
            if fd is not None and resolved is not None:
                state.fds[fd] = (resolved, flags or 0)
            return replace(call, path=resolved, fd=fd, flags=flags)
        if kind is CallKind.WRITE:
            fd, path = self._fd_arg(pid, arg(0))
            offset = None
            if name == "pwrite64" or name in ("pwritev", "pwritev2"):
                offset = _int(arg(3))
            if name in ("writev", "pwritev", "pwritev2"):
                lengths = [int(x) for x in re.findall(r"iov_len=(\d+)", arg(1) or "")]
                length = sum(lengths) if lengths else None
                first = re.search(r'iov_base=("(?:[^"\\]|\\.)*")', arg(1) or "")
                data = _string(first.group(1)) if first else None
            else:
                length, data = _int(arg(2)), _string(arg(1))
            return replace(call, fd=fd, path=path, offset=offset, length=length, data=data)
        if kind is CallKind.TRUNCATE:
            if name == "ftruncate":
                fd, path = self._fd_arg(pid, arg(0))
                return replace(call, fd=fd, path=path, length=_int(arg(1)))
            return replace(call, path=self._resolve(pid, _string(arg(0))), length=_int(arg(1)))
        if kind is CallKind.FALLOCATE:
            fd, path = self._fd_arg(pid, arg(0))
            return replace(
                call, fd=fd, path=path, flags=_int(arg(1)), offset=_int(arg(2)), length=_int(arg(3))
            )
        if kind in (CallKind.RENAME, CallKind.LINK):
            if name in ("renameat", "renameat2", "linkat"):
                src = self._resolve(pid, _string(arg(1)), arg(0))
                dst = self._resolve(pid, _string(arg(3)), arg(2))
                flags = _int(arg(4))
            else:
                src = self._resolve(pid, _string(arg(0)))
                dst = self._resolve(pid, _string(arg(1)))
                flags = None
            return replace(call, path=src, path2=dst, flags=flags)
        if kind is CallKind.SYMLINK:
            target = _string(arg(0))
            if name == "symlinkat":
                link = self._resolve(pid, _string(arg(2)), arg(1))
            else:
                link = self._resolve(pid, _string(arg(1)))
            return replace(call, path=link, path2=None if target is None else _decode_path(target))
        if kind is CallKind.UNLINK:
            if name == "unlinkat":
                flags = _int(arg(2)) or 0
                path = self._resolve(pid, _string(arg(1)), arg(0))
                real = CallKind.RMDIR if flags & AT_REMOVEDIR else CallKind.UNLINK
                return replace(call, kind=real, path=path, flags=flags)
            return replace(call, path=self._resolve(pid, _string(arg(0))))
        if kind is CallKind.MKDIR:
            if name == "mkdirat":
                return replace(call, path=self._resolve(pid, _string(arg(1)), arg(0)))
            return replace(call, path=self._resolve(pid, _string(arg(0))))
        if kind is CallKind.RMDIR:
            return replace(call, path=self._resolve(pid, _string(arg(0))))
        if kind in (CallKind.FSYNC, CallKind.FDATASYNC, CallKind.SYNCFS):
            fd, path = self._fd_arg(pid, arg(0))
            return replace(call, fd=fd, path=path)
        if kind is CallKind.SYNC_FILE_RANGE:
            fd, path = self._fd_arg(pid, arg(0))
            return replace(
                call, fd=fd, path=path, offset=_int(arg(1)), length=_int(arg(2)), flags=_int(arg(3))
            )
        if kind is CallKind.MSYNC:
            addr = _int(arg(0))
            path = None
            for start, length, mapped in reversed(state.maps):
                if addr is not None and start <= addr < start + length:
                    path = mapped
                    break
            return replace(call, path=path, offset=addr, length=_int(arg(1)), flags=_int(arg(2)))
        if kind is CallKind.SEEK:
            fd, path = self._fd_arg(pid, arg(0))
            return replace(call, fd=fd, path=path, offset=call.result if ok else None)
        if kind is CallKind.CLOSE:
            fd, path = self._fd_arg(pid, arg(0))
            if fd is not None:
                state.fds.pop(fd, None)
            return replace(call, fd=fd, path=path)
        if kind is CallKind.MMAP:
            fd, path = self._fd_arg(pid, arg(4))
            flags = _int(arg(3)) or 0
            if ok and path is not None and flags & MAP_SHARED and call.result is not None:
                length = _int(arg(1)) or 0
                state.maps.append((call.result, length, path))
                del state.maps[:-64]
                return replace(call, fd=fd, path=path, flags=flags, length=length)
            return None  # private or anonymous mappings: only the loader's noise
        if kind is CallKind.DUP or name == "fcntl":
            fd, path = self._fd_arg(pid, arg(0))
            if name == "fcntl":
                if _int(arg(1)) not in (F_DUPFD, F_DUPFD_CLOEXEC):
                    return None
                call = replace(call, kind=CallKind.DUP)
            if ok and call.result is not None:
                if path is not None:
                    state.fds[call.result] = (path, state.fds.get(fd or -1, (path, 0))[1])
                else:
                    state.fds.pop(call.result, None)  # now a pipe or socket: no file
            return replace(call, fd=fd, path=path)
        if kind is CallKind.SYNC:
            return call
        if kind is CallKind.CHDIR:
            if name == "fchdir":
                fd, path = self._fd_arg(pid, arg(0))
            else:
                fd, path = None, self._resolve(pid, _string(arg(0)))
            if ok and path is not None and path.startswith("/"):
                state.cwd = path
            return replace(call, fd=fd, path=path)
        if kind is CallKind.CLONE:
            child = call.result if ok else None
            if child is not None and child > 0:
                flags = _int(arg(1)) if name == "clone" else _int(_field(arg(0), "flags"))
                copy = _ProcState(state.cwd, dict(state.fds), list(state.maps))
                self._procs[child] = copy
                prior = self._info.get(child, Process(child))
                self._info[child] = replace(prior, parent=pid, argv=self._info[pid].argv)
                return replace(call, flags=flags, result=child)
            return None  # the child's own return (0) adds nothing
        if kind is CallKind.EXEC:
            path_arg = arg(1) if name == "execveat" else arg(0)
            argv_arg = arg(2) if name == "execveat" else arg(1)
            path = self._resolve(pid, _string(path_arg))
            if ok:
                argv = tuple(
                    _decode_path(unescape(s))
                    for s in re.findall(r'"((?:[^"\\]|\\.)*)"', argv_arg or "")
                )
                self._info[pid] = replace(self._info[pid], argv=argv)
                state.maps.clear()
                state.fds = {k: v for k, v in state.fds.items() if not v[1] & O_CLOEXEC}
            return replace(call, path=path)
        return None

    # -- output -------------------------------------------------------------------------

    def trace(self) -> Trace:
        """What the parser has so far; a last line without its newline counts as truncated."""
        calls = [c for _t, _l, c in sorted(self._calls, key=lambda x: (x[0], x[1]))]
        # Calls still waiting for their `resumed` line never returned (as far as the trace knows).
        unfinished = []
        for pid, p in self._pending.items():
            call = Call(
                index=0, pid=pid, name=p.name, kind=KIND_OF.get(p.name, CallKind.OTHER),
                enter_ns=p.enter_ns,
            )  # fmt: skip
            args, _after = split_args(p.args)
            interpreted = self._peek(call, args)
            if interpreted is not None:
                unfinished.append(interpreted)
        if unfinished:
            calls = sorted(calls + unfinished, key=lambda c: c.enter_ns)
        numbered = tuple(replace(c, index=i) for i, c in enumerate(calls))
        return Trace(
            calls=numbered,
            processes=tuple(self._info[p] for p in sorted(self._info)),
            signals=tuple(self._signals),
            truncated=1 if self._partial.strip() else 0,
            unparsed=tuple(self._unparsed),
            unparsed_count=self._unparsed_count,
        )

    def _peek(self, call: Call, args: list[str]) -> Call | None:
        """An unfinished call's arguments interpreted without touching the tables."""
        saved = {
            pid: _ProcState(s.cwd, dict(s.fds), list(s.maps)) for pid, s in self._procs.items()
        }
        info = dict(self._info)
        try:
            return self._interpret(call, args, None)
        finally:
            self._procs, self._info = saved, info


_DURATION_AT_END = re.compile(r"<(\d+)\.(\d{1,9})>\s*$")


def printed_at(text: str) -> int | None:
    """The guest time by which strace had printed this line: a call's enter time plus
    its duration (strace prints a call when it returns), else the line's own time."""
    m = _LINE.fullmatch(text.rstrip("\r"))
    if m is None:
        return None
    at = _time_ns(m.group(2), m.group(3))
    dur = _DURATION_AT_END.search(m.group(4))
    if dur is not None and not m.group(4).startswith("<..."):
        at += _time_ns(dur.group(1), dur.group(2))
    return at


def parse_strace(text: str | bytes | Iterable[str]) -> Trace:
    """A whole trace at once (a file read back, a test's lines)."""
    parser = StraceParser()
    if isinstance(text, (str, bytes)):
        parser.feed(text)
    else:
        for line in text:
            parser.line(line)
    return parser.trace()
