"""tracefs events back into calls: real lines of the guest's instance, as `cat trace_pipe`
printed them (Debian's 6.1 kernel, `mono` clock), for `cd /mnt && sqlite3 ... && echo ack 1;
echo x > a.tmp && mv a.tmp a && sync a` (data/tracefs-sh-sqlite-mv-sync.txt, an excerpt).

The kernel gives pointers where strace gives strings: the names come from the
`getname*` kretprobes matched by user pointer (renameat2 copies its new name
before its old one), relative names resolve against the cwd the `chdir` set
and forks inherit, descriptors follow opens, dups and closes.
"""

from __future__ import annotations

from pathlib import Path

from harness.explore.syscalls import CallKind
from harness.guest.tracefs import (
    INSTANCE,
    TracefsConverter,
    reader_command,
    setup_script,
    traced_command,
)

EXCERPT = (Path(__file__).parent / "data" / "tracefs-sh-sqlite-mv-sync.txt").read_text()


def _calls() -> list[tuple[int, str, str | None, str | None]]:
    conv = TracefsConverter()
    conv.feed(EXCERPT)
    trace = conv.trace()
    assert conv.unknown == 0 and trace.unparsed_count == 0, trace.unparsed
    return [(c.pid, c.name, c.path, c.path2) for c in trace.calls]


def test_names_come_from_the_kernels_copies_matched_by_user_pointer() -> None:
    calls = _calls()
    assert (178, "renameat2", "/mnt/a.tmp", "/mnt/a") in calls  # not swapped
    assert (166, "openat", "/mnt/a.tmp", None) in calls
    assert (179, "openat", "/mnt/a", None) in calls  # a child inherits the cwd


def test_descriptors_follow_dup2_and_a_restored_stdout_is_no_file() -> None:
    conv = TracefsConverter()
    conv.feed(EXCERPT)
    trace = conv.trace()
    writes = [c for c in trace.calls if c.kind is CallKind.WRITE]
    assert [(w.path, w.data) for w in writes] == [(None, b"ack 1\n"), ("/mnt/a.tmp", b"x\n")]
    fsync = next(c for c in trace.calls if c.kind is CallKind.FSYNC)
    assert fsync.path == "/mnt/a" and fsync.exit_ns == 22_182_209_000
    assert fsync.enter_ns == 22_123_773_000
    parents = {p.pid: p.parent for p in trace.processes}
    assert parents[178] == 166 and parents[179] == 166


def test_where_no_getname_fired_the_tracepoints_own_string_names_the_path() -> None:
    conv = TracefsConverter(cwd="/mnt")
    conv.feed(
        "  perl-9 [000] ...1. 5.000100: sys_mkdir(pathname: 55aa, mode: 1ff)\n"
        '  perl-9 [000] ...2. 5.000101: u_mkdir: (syscalls.sys_enter_mkdir) pathname="e"\n'
        "  perl-9 [000] ...1. 5.000200: sys_mkdir -> 0x0\n"
        "  perl-9 [000] ...1. 5.000300: sys_unlink(pathname: 55ab)\n"
        "  perl-9 [000] ...2. 5.000301: u_unlink: (syscalls.sys_enter_unlink) pathname=(fault)\n"
        "  perl-9 [000] ...1. 5.000400: sys_unlink -> 0x0\n"
    )
    mkdir, unlink = conv.trace().calls
    assert (mkdir.name, mkdir.path) == ("mkdir", "/mnt/e")
    assert (unlink.name, unlink.path) == ("unlink", None)  # faulted: unknown, not guessed


def test_a_call_still_open_when_the_trace_ends_never_returned() -> None:
    conv = TracefsConverter()
    cut = EXCERPT[: EXCERPT.index("sys_fsync -> 0x0")]
    conv.feed(cut[: cut.rindex("\n") + 1])
    (fsync,) = [c for c in conv.trace().calls if c.kind is CallKind.FSYNC]
    assert fsync.exit_ns is None and not fsync.ok and fsync.path == "/mnt/a"


def test_the_scripts_name_the_instance_and_what_is_missing() -> None:
    script = setup_script()
    assert f"I={INSTANCE}" in script and "echo ready" in script
    assert 'missing "syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"' in script
    assert "r:powercut/getname getname ptr=$retval" in script
    assert "syscalls/sys_enter_fsync syscalls/sys_exit_fsync" in script
    cmd = traced_command("cd /mnt && echo 'x'")
    assert "set_event_pid" in cmd and cmd.endswith("'cd /mnt && echo '\\''x'\\'''")
    assert reader_command().endswith(f"'{INSTANCE}/trace_pipe'")
