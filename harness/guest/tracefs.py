"""Tracing through the kernel's own syscall tracepoints (tracefs): the default mechanism.

Measured in the guest under TCG (`python -m benchmarks trace`, docs/tracing.md):
strace stops the tracee twice per traced call, which a process-per-transaction
workload (the shipped sqlite scenario: a sqlite3 exec per insert, ~60 traced
calls each, most of them the dynamic loader's) pays 2.0-3.5x for (medians of
three runs); the kernel's tracepoints write each event into a ring buffer
without stopping anyone: 1.1-1.5x on the same run phase (medians of two runs;
single rounds 0.8-2.0x on a loaded machine; docs/tracing.md). Tracepoints see
the calls' arguments as numbers, though, so three things are added:

- names: a syscall tracepoint holds a pointer, and reading user memory from it
  (eprobe `ustring`) fails whenever the page is not resident ("(fault)": 270
  of 3558 events in that run). The kernel copies every path into a `struct
  filename` (`getname`, `getname_flags`, `getname_uflags`); a kretprobe on
  each reads the copy from kernel memory, with the user pointer it came from
  (`uptr`), which matches it to the call's argument;
- what is written to descriptors 0-2 (an eprobe on `sys_enter_write`; a
  `ustring` read, the only user-memory fetch an eprobe takes, which runs to
  the first NUL and is cut to the call's count here; printed raw, so a
  newline in it continues the event on the next line), so the workload's
  acknowledgement lines are in the trace and place each acknowledgement on
  the guest's clock;
- the process tree: `set_event_pid` with `event-fork` in a tracing instance
  of its own, and `sched_process_fork` for the parent of each child.

`TracefsConverter` turns the events back into the lines strace would have
printed without `-y`, and `StraceParser`'s descriptor table, working
directory per process and inheritance across fork and exec resolve the paths
(the traced shell's `cd` is the first call it sees). One model, one parser
of paths, two mechanisms: where the kernel lacks tracefs, syscall tracepoints,
kprobe or eprobe events (a user's `--kernel`), `setup_script` says what is
missing and the caller falls back to strace (`harness.explore.syscalls`).

Times are the instance's `mono` clock (the guest's CLOCK_MONOTONIC, in µs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.explore.syscalls import FILE_CALLS, LineFed, StraceParser, Trace

TRACEFS = "/sys/kernel/tracing"
INSTANCE = f"{TRACEFS}/instances/powercut"
READER_PID = "/run/powercut-trace-reader.pid"
# The calls whose enter and exit events are enabled: the file calls, and what the parser
# needs to follow descriptors and the working directory. Forks come from sched_process_fork.
TRACEFS_CALLS = (*FILE_CALLS, "dup", "dup2", "dup3", "fcntl", "chdir", "fchdir", "execve")
_GETNAME = ("getname", "getname_flags", "getname_uflags")
# Where the kernel may inline getname into the syscall (mkdir, rmdir and unlink on Debian's
# 6.1 leave no kretprobe event), the tracepoint's own pointer is read too (`ustring`: it can
# fault, so the kernel's copy wins when there is one). Not for open, openat and execve: the
# dynamic loader makes them by the dozen, and their getname is never inlined (fs/open.c,
# fs/exec.c call it from another file).
PATH_ARGS = {
    "creat": ("pathname",), "truncate": ("path",),
    "rename": ("oldname", "newname"), "renameat": ("oldname", "newname"),
    "renameat2": ("oldname", "newname"), "link": ("oldname", "newname"),
    "linkat": ("oldname", "newname"), "symlink": ("oldname", "newname"),
    "symlinkat": ("oldname", "newname"), "unlink": ("pathname",), "unlinkat": ("pathname",),
    "mkdir": ("pathname",), "mkdirat": ("pathname",), "rmdir": ("pathname",),
    "chdir": ("filename",),
}  # fmt: skip


def setup_script(calls: tuple[str, ...] = TRACEFS_CALLS) -> str:
    """A /bin/sh script that prepares the instance; prints `missing: WHAT` and exits 3 if the
    kernel cannot (then trace with strace), `ready` otherwise. Safe to run again."""
    enables = " ".join(f"syscalls/sys_enter_{c} syscalls/sys_exit_{c}" for c in calls)
    probes = "\n".join(
        f"echo 'r:powercut/{g} {g} ptr=$retval name=+0(+0($retval)):string "
        f"uptr=+8($retval):x64' >> $T/kprobe_events 2>/dev/null || missing 'kprobe on {g}'"
        for g in _GETNAME
    )
    return f"""
set -u
missing() {{ echo "missing: $1"; exit 3; }}
T={TRACEFS}
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null || missing "tracefs (CONFIG_TRACING)"
[ -d $T/events/syscalls ] || missing "syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"
[ -e $T/kprobe_events ] || missing "kprobe events (CONFIG_KPROBE_EVENTS)"
grep -q 'e\\[:' $T/README 2>/dev/null || missing "eprobes (Linux 5.15 or later)"
I={INSTANCE}
if [ -d $I ]; then echo 0 > $I/tracing_on; echo 0 > $I/events/enable; rmdir $I; fi
for e in wdata {" ".join(f"u_{c}" for c in PATH_ARGS)}; do
  echo "-:powercut/$e" >> $T/dynamic_events 2>/dev/null
done
for g in {" ".join(_GETNAME)}; do echo "-:powercut/$g" >> $T/kprobe_events 2>/dev/null; done
{probes}
echo 'e:powercut/wdata syscalls.sys_enter_write fd=$fd count=$count buf=+u0($buf):ustring \
if fd < 3' >> $T/dynamic_events || missing "eprobes on syscall tracepoints"
{_path_probes()}
mkdir $I || missing "tracing instances"
echo 0 > $I/tracing_on
echo mono > $I/trace_clock
echo 4096 > $I/buffer_size_kb
echo 1 > $I/options/event-fork
for e in {enables} sched/sched_process_fork powercut/wdata \
         {" ".join(f"powercut/{g}" for g in _GETNAME)} \
         {" ".join(f"powercut/u_{c}" for c in PATH_ARGS)}; do
  [ -e $I/events/$e/enable ] && echo 1 > $I/events/$e/enable
done
# fcntl only where it makes a descriptor (F_DUPFD, F_DUPFD_CLOEXEC): SQLite takes its locks
# with fcntl, ten per transaction; the exits of the others arrive without an enter, dropped.
[ -e $I/events/syscalls/sys_enter_fcntl/filter ] && \
  echo 'cmd == 0 || cmd == 1030' > $I/events/syscalls/sys_enter_fcntl/filter
echo ready
"""


def _path_probes() -> str:
    lines = []
    for call, fields in PATH_ARGS.items():
        args = " ".join(f"{f}=+u0(${f}):ustring" for f in fields)
        lines.append(
            f"[ -d $T/events/syscalls/sys_enter_{call} ] && echo 'e:powercut/u_{call} "
            f"syscalls.sys_enter_{call} {args}' >> $T/dynamic_events"
        )
    return "\n".join(lines)


def traced_command(command: str) -> str:
    """`command` (a /bin/sh command) as the root of the traced tree: its own shell's pid is
    the instance's filter, forks follow, and tracing is on from its first exec."""
    inner = (
        f"echo $$ > {INSTANCE}/set_event_pid && echo > {INSTANCE}/trace && "
        f'echo 1 > {INSTANCE}/tracing_on && exec sh -c "$0"'
    )
    return f"sh -c {_quote(inner)} {_quote(command)}"


def reader_command() -> str:
    """The reader: every event as the instance records it, until it is killed (`stop`)."""
    return batching_reader(f"{INSTANCE}/trace_pipe", READER_PID)


def stop_command() -> str:
    return (
        f"echo 0 > {INSTANCE}/tracing_on; echo > {INSTANCE}/set_event_pid; "
        f"kill $(cat {READER_PID}) 2>/dev/null; true"
    )


# Reads what is there, sends it, sleeps 50 ms: under TCG each wake-up of a reader and each
# SSH packet costs the workload's one vCPU more than the events themselves (a `cat` woken per
# event made the traced fsync loop 1.8x slower). The trace's tail lags by at most that much.
BATCH_SECONDS = 0.05


def batching_reader(path: str, pidfile: str | None = None) -> str:
    """A guest command that copies `path` (a FIFO, trace_pipe) to stdout in batches."""
    record = f"echo $$ > {pidfile}; " if pidfile else ""
    return (
        f'{record}exec perl -e \'open(my $f, "<", $ARGV[0]) or die "$ARGV[0]: $!\\n"; '
        "while (1) { my $n = sysread($f, my $b, 1 << 20); last unless $n; "
        f"syswrite(STDOUT, $b); select(undef, undef, undef, {BATCH_SECONDS}) }}' {_quote(path)}"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- the events back into strace's lines -------------------------------------------------

_EVENT = re.compile(
    r"\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>\S{4,5})\s+)?(?P<s>\d+)\.(?P<frac>\d+):\s+(?P<body>.*)"
)
_NAMED = re.compile(r"(?P<event>\w+): (?P<rest>.*)")
_ENTER = re.compile(r"sys_(\w+)\((.*)\)")
_EXIT = re.compile(r"sys_(\w+) -> 0x([0-9a-f]+)")
_FIELD = re.compile(r"(\w+): ([0-9a-f]+)")
_FORK = re.compile(r"comm=.* pid=(\d+) child_comm=.* child_pid=(\d+)")
_USTRING = re.compile(r'(\w+)="([^"]*)"')
_NAME = re.compile(r'\(.*?<- (\w+)\) ptr=0x([0-9a-f]+) name="(.*)" uptr=0x([0-9a-f]+)$')
_WDATA = re.compile(r'\(.*?\) fd=0x([0-9a-f]+) count=0x([0-9a-f]+) buf="(.*)', re.DOTALL)
# Arguments that are descriptors (printed as signed ints) and paths (filled from getname).
_FD_FIELDS = frozenset({"fd", "dfd", "olddfd", "newdfd", "oldfd", "newfd", "fildes"})
_PATH_FIELDS = frozenset({"filename", "pathname", "oldname", "newname", "path"})
ERRNO = {
    1: "EPERM", 2: "ENOENT", 4: "EINTR", 5: "EIO", 9: "EBADF", 11: "EAGAIN", 13: "EACCES",
    17: "EEXIST", 18: "EXDEV", 20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 24: "EMFILE",
    28: "ENOSPC", 30: "EROFS", 38: "ENOSYS", 39: "ENOTEMPTY", 95: "EOPNOTSUPP",
    512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND", 516: "ERESTART_RESTARTBLOCK",
}  # fmt: skip


def _signed(value: int, bits: int = 64) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


@dataclass
class _Open:
    name: str
    fields: list[tuple[str, int]]
    enter: str  # the event's time as strace prints it
    enter_us: int
    names: dict[int, str] = field(default_factory=dict)  # user pointer -> the kernel's copy
    seen: set[int] = field(default_factory=set)  # struct filename pointers already taken
    fallback: dict[str, str] = field(default_factory=dict)  # field -> the user string read
    data: bytes | None = None


class TracefsConverter(LineFed):
    """Feeds a `StraceParser` with the lines strace would have printed for these events."""

    def __init__(self, parser: StraceParser | None = None, cwd: str | None = None) -> None:
        self.parser = parser if parser is not None else StraceParser(initial_cwd=cwd)
        self._open: dict[int, _Open] = {}
        self.events = 0
        self.unknown = 0

    def line(self, text: str) -> None:
        m = _EVENT.fullmatch(text.rstrip("\r"))
        if m is None:
            if self._data is not None:
                self._data[2].append(text)  # a written string's newline: the event goes on
            elif text.strip() and not text.startswith("#"):
                self.unknown += 1
            return
        self._end_data()
        self.events += 1
        pid, body = int(m.group("pid")), m.group("body")
        frac = m.group("frac")
        stamp = f"{m.group('s')}.{frac.ljust(9, '0')[:9]}"
        us = int(m.group("s")) * 1_000_000 + int(frac.ljust(6, "0")[:6])
        if body.startswith("sys_"):
            self._syscall(pid, body, stamp, us)
            return
        named = _NAMED.fullmatch(body)
        if named is None:
            self.unknown += 1
            return
        event, rest = named.group("event"), named.group("rest")
        if event == "sched_process_fork":
            if f := _FORK.search(rest):
                parent, child = int(f.group(1)), int(f.group(2))
                self.parser.line(f"{parent} {stamp} clone(0, 0, 0, 0, 0) = {child} <0.000000>")
        elif event in _GETNAME:
            n = _NAME.search(rest)
            pending = self._open.get(pid)
            if n is not None and pending is not None:
                ptr, uptr = int(n.group(2), 16), int(n.group(4), 16)
                if ptr not in pending.seen:
                    pending.seen.add(ptr)
                    pending.names.setdefault(uptr, n.group(3))
        elif event.startswith("u_"):
            pending = self._open.get(pid)
            if pending is not None and pending.name == event[2:]:
                for fname, text in _USTRING.findall(rest):
                    pending.fallback.setdefault(fname, text)
        elif event == "wdata":
            w = _WDATA.search(rest)
            if w is not None:
                self._data = (pid, int(w.group(2), 16), [w.group(3)])
        else:
            self.unknown += 1

    _wdata: tuple[int, bytes] | None = None
    _data: tuple[int, int, list[str]] | None = None

    def _end_data(self) -> None:
        """A written string is whole once the next event starts: cut it to the call's count."""
        if self._data is None:
            return
        pid, count, parts = self._data
        self._data = None
        raw = "\n".join(parts).encode("utf-8", "surrogateescape")[:count]
        pending = self._open.get(pid)
        if pending is not None and pending.name == "write" and pending.data is None:
            pending.data = raw  # recorded after the call's own enter event
        else:
            self._wdata = (pid, raw)  # before it: the next enter of this process

    def _syscall(self, pid: int, rest: str, stamp: str, us: int) -> None:
        if enter := _ENTER.fullmatch(rest):
            fields = [(k, int(v, 16)) for k, v in _FIELD.findall(enter.group(2))]
            pending = _Open(enter.group(1), fields, stamp, us)
            if self._wdata is not None and self._wdata[0] == pid:
                pending.data = self._wdata[1]
            self._wdata = None
            self._open[pid] = pending
            return
        if done := _EXIT.fullmatch(rest):
            started = self._open.pop(pid, None)
            if started is None or started.name != done.group(1):
                return  # an exit whose enter came before tracing started
            value = _signed(int(done.group(2), 16))
            dur = max(0, us - started.enter_us)
            self.parser.line(
                f"{pid} {started.enter} {self._call(started, value)} <{dur // 1_000_000}."
                f"{dur % 1_000_000:06d}>"
            )
            return
        self.unknown += 1

    def _call(self, p: _Open, value: int) -> str:
        args = ", ".join(self._args(p, value))
        if -4096 < value < 0:
            errno = ERRNO.get(-value, f"E{-value}")
            return f"{p.name}({args}) = -1 {errno} (errno {-value})"
        return f"{p.name}({args}) = {value}"

    def _args(self, p: _Open, value: int) -> list[str]:
        args = []
        for name, raw in p.fields:
            if name in _FD_FIELDS:
                args.append(str(_signed(raw & 0xFFFFFFFF, 32)))
            elif name in _PATH_FIELDS:
                text = p.names.get(raw)
                if text is None and p.fallback.get(name, "(fault)") != "(fault)":
                    text = p.fallback[name]
                args.append("NULL" if text is None else '"' + _escape(text) + '"')
            elif name == "buf" and p.name in ("write", "pwrite64"):
                args.append('"' + _escape_bytes(p.data or b"") + '"')
            elif name == "vec":
                args.append(f'[{{iov_base="", iov_len={max(value, 0)}}}]')
            else:
                args.append(str(raw))
        return args

    def trace(self) -> Trace:
        """The parsed trace; calls still open at the end count as never returned."""
        self._end_data()
        parser = self.parser
        for pid, p in self._open.items():
            args = ", ".join(self._args(p, 0))
            parser.line(f"{pid} {p.enter} {p.name}({args} <unfinished ...>")
        self._open.clear()
        return parser.trace()


def _escape(text: str) -> str:
    return _escape_bytes(text.encode("utf-8", "surrogateescape"))


def _escape_bytes(raw: bytes) -> str:
    out = []
    for i, b in enumerate(raw):
        if b == 34:
            out.append('\\"')
        elif b == 92:
            out.append("\\\\")
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            nxt = raw[i + 1 : i + 2]
            out.append("\\" + (format(b, "03o") if nxt and 48 <= nxt[0] <= 55 else format(b, "o")))
    return "".join(out)
