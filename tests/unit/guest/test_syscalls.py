"""The strace parser: real lines of strace 6.1 (-f -y -X raw -T --timestamps=unix,ns), and
generated traces cut anywhere, fed in any pieces.

The lines below were printed by the guest's strace (Debian 12's 6.1) on the
calls named; the property test renders calls the way strace does (its C
escapes, `<unfinished ...>`/`<... resumed>` when processes interleave) and
checks the parser gives every call back, whatever the chunking and wherever
the stream is cut.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.explore.syscalls import (
    O_CREAT,
    O_DSYNC,
    O_SYNC,
    O_TRUNC,
    O_WRONLY,
    CallKind,
    StraceParser,
    Trace,
    open_flag_names,
    parse_strace,
    printed_at,
    split_args,
    strace_command,
    unescape,
)

T0 = "1796522124.369292552"

REAL = """\
32379 1796522124.381316611 chdir("/mnt") = 0 <0.000010>
32379 1796522124.381380386 openat(-100</mnt>, "x.tmp", 0x241, 0666) = 3</mnt/x.tmp> <0.003722>
32379 1796522124.385361008 write(3</mnt/x.tmp>, "hello\\n", 6) = 6 <0.000034>
32382 1796522124.392326364 fsync(3</mnt/x.tmp>) = 0 <0.012357>
32386 1796522124.409973506 renameat2(-100</mnt>, "x.tmp", -100</mnt>, "x", 0x1) = 0 <0.000029>
32379 1796522124.410539626 write(1<pipe:[51099]>, "ack 1\\n", 6) = 6 <0.000015>
32387 1796522125.157894088 openat(-100</mnt>, "m", 0x81242, 0644) = 3</mnt/m> <0.000117>
32387 1796522125.158058562 ftruncate(3</mnt/m>, 4096) = 0 <0.000015>
32387 1796522125.158970497 pwrite64(3</mnt/m>, "zz", 2, 10) = 2 <0.000218>
32387 1796522125.159277903 fdatasync(3</mnt/m>) = 0 <0.000683>
32387 1796522125.161285125 rename("m", "m2") = 0 <0.000062>
32387 1796522125.161444852 link("m2", "m3") = 0 <0.000042>
32387 1796522125.161585451 unlink("m3") = 0 <0.000041>
32387 1796522125.161717787 mkdir("dd", 0777) = 0 <0.000163>
32387 1796522125.162291369 unlinkat(-100</mnt>, "dd", 0x200) = 0 <0.001361>
32387 1796522125.163738479 openat(-100</mnt>, ".", 0x90000) = 4</mnt> <0.000041>
32387 1796522125.163857916 fsync(4</mnt>) = 0 <0.001504>
32387 1796522125.165439986 sync() = 0 <0.004212>
32387 1796522125.172466432 close(3</mnt/m2>) = 0 <0.000150>
32387 1796522125.172566432 openat(-100</mnt>, "nope", 0) = -1 ENOENT (No such file or directory) \
<0.000011>
32379 1796522125.182280820 --- SIGCHLD {si_signo=17, si_code=0x1, si_pid=32387, si_uid=0} ---
32387 1796522125.182380820 +++ exited with 0 +++
"""


def test_real_lines_give_each_call_its_paths_flags_and_times() -> None:
    trace = parse_strace(REAL)
    assert trace.unparsed_count == 0, trace.unparsed
    by = [(c.name, c.path, c.path2) for c in trace.calls]
    assert ("openat", "/mnt/x.tmp", None) in by
    assert ("renameat2", "/mnt/x.tmp", "/mnt/x") in by
    # No annotation on rename(2): the cwd strace showed with AT_FDCWD resolves it.
    assert ("rename", "/mnt/m", "/mnt/m2") in by
    assert ("link", "/mnt/m2", "/mnt/m3") in by
    assert ("mkdir", "/mnt/dd", None) in by
    assert ("sync", None, None) in by  # no argument, but a persistence point all the same
    rmdir = next(c for c in trace.calls if c.name == "unlinkat")
    assert rmdir.kind is CallKind.RMDIR and rmdir.path == "/mnt/dd"
    opened = next(c for c in trace.calls if c.path == "/mnt/m" and c.kind is CallKind.OPEN)
    assert opened.flags is not None and opened.flags & O_DSYNC and opened.synchronous
    assert "O_DSYNC" in open_flag_names(opened.flags) and "O_TRUNC" in open_flag_names(opened.flags)
    pwrite = next(c for c in trace.calls if c.name == "pwrite64")
    assert (pwrite.offset, pwrite.length, pwrite.data) == (10, 2, b"zz")
    fsync = next(c for c in trace.calls if c.name == "fsync")
    assert fsync.enter_ns == 1796522124392326364 and fsync.exit_ns == fsync.enter_ns + 12357000
    dirsync = [c for c in trace.calls if c.name == "fsync"][1]
    assert dirsync.path == "/mnt" and dirsync.fd == 4
    failed = next(c for c in trace.calls if c.path == "/mnt/nope")
    assert failed.errno == "ENOENT" and not failed.ok
    ack = next(c for c in trace.calls if c.data == b"ack 1\n")
    assert ack.path is None and ack.fd == 1  # a pipe has no path
    assert [c.index for c in trace.calls] == list(range(len(trace.calls)))
    assert trace.signals[0].name == "SIGCHLD"
    assert {p.pid: p.exit_code for p in trace.processes}[32387] == 0


def test_an_interrupted_call_is_joined_with_its_resumed_half() -> None:
    trace = parse_strace(
        "7 100.000000100 fsync(3</mnt/a> <unfinished ...>\n"
        '8 100.000000200 write(4</mnt/b>, "x", 1) = 1 <0.000000010>\n'
        "7 100.000900000 <... fsync resumed>) = 0 <0.000899900>\n"
    )
    fsync = next(c for c in trace.calls if c.name == "fsync")
    assert fsync.path == "/mnt/a" and fsync.enter_ns == 100_000_000_100
    assert fsync.exit_ns == 100_000_900_000 and fsync.ok
    assert [c.name for c in trace.calls] == ["fsync", "write"]  # by enter time


def test_a_call_that_never_resumed_has_no_exit_and_is_not_ok() -> None:
    trace = parse_strace(
        "7 100.0 fdatasync(3</mnt/a> <unfinished ...>\n7 100.5 +++ killed by SIGKILL +++\n"
    )
    (call,) = trace.calls
    assert call.kind is CallKind.FDATASYNC and call.path == "/mnt/a"
    assert call.exit_ns is None and not call.ok
    assert trace.processes[0].killed_by == "SIGKILL"


def test_the_last_line_without_its_newline_is_dropped_and_counted() -> None:
    parser = StraceParser()
    parser.feed('7 100.0 write(3</mnt/a>, "x", 1) = 1 <0.000001>\n7 100.1 fsync(3</mnt/a>) = ')
    trace = parser.trace()
    assert [c.name for c in trace.calls] == ["write"]
    assert trace.truncated == 1 and trace.unparsed_count == 0


def test_a_trace_without_descriptor_paths_follows_opens_dups_and_the_cwd() -> None:
    trace = parse_strace(
        '5 1.0 chdir("/data") = 0 <0.000001>\n'
        '5 1.1 openat(-100, "f", 0x241, 0644) = 3 <0.000001>\n'
        "5 1.2 dup2(3, 7) = 7 <0.000001>\n"
        '5 1.3 write(7, "a", 1) = 1 <0.000001>\n'
        "5 1.4 clone(0, 0x1200011, 0, 0, 0) = 6 <0.000001>\n"
        "6 1.5 fsync(3) = 0 <0.000001>\n"
        '6 1.6 rename("f", "g") = 0 <0.000001>\n'
    )
    paths = {c.name: c.path for c in trace.calls}
    assert paths["openat"] == "/data/f" and paths["write"] == "/data/f"
    assert paths["fsync"] == "/data/f"  # the child inherited the descriptor
    assert next(c for c in trace.calls if c.name == "rename").path2 == "/data/g"
    assert {p.pid: p.parent for p in trace.processes}[6] == 5


def test_msync_names_the_file_its_shared_mapping_came_from() -> None:
    trace = parse_strace(
        '5 1.0 openat(-100</m>, "db", 0x2) = 3</m/db> <0.000001>\n'
        "5 1.1 mmap(NULL, 8192, 0x3, 0x1, 3</m/db>, 0) = 0x7f0000000000 <0.000001>\n"
        "5 1.2 mmap(NULL, 4096, 0x3, 0x22, -1, 0) = 0x7f0000100000 <0.000001>\n"
        "5 1.3 msync(0x7f0000001000, 4096, 0x4) = 0 <0.000001>\n"
    )
    msync = next(c for c in trace.calls if c.kind is CallKind.MSYNC)
    assert msync.path == "/m/db"
    assert [c.kind for c in trace.calls].count(CallKind.MMAP) == 1  # the anonymous one is noise


def test_escaped_paths_and_deleted_files() -> None:
    trace = parse_strace(
        '5 1.0 openat(-100</m>, "a>b", 0x241, 0600) = 3</m/a\\76b> <0.000001>\n'
        '5 1.1 openat(-100</m>, "\\303\\274", 0x241, 0600) = 4</m/\\303\\274> <0.000001>\n'
        "5 1.2 close(4</m/\\303\\274 (deleted)>) = 0 <0.000001>\n"
        '5 1.3 openat(-100</m>, "/dev/null", 0x1) = 5</dev/null<char 1:3>> <0.000001>\n'
    )
    assert [c.path for c in trace.calls] == ["/m/a>b", "/m/ü", "/m/ü", "/dev/null"]


def test_the_command_traces_the_whole_tree_into_its_output() -> None:
    cmd = strace_command("echo 'it''s' > f", "/run/t.fifo")
    assert cmd.startswith("exec strace -f ") and "--seccomp-bpf" in cmd and " -y " in cmd
    assert "-o '/run/t.fifo'" in cmd and "fsync" in cmd and "renameat2" in cmd
    assert cmd.endswith("sh -c 'echo '\\''it'\\'''\\''s'\\'' > f'")


def test_printed_at_is_the_return_for_a_whole_line_and_the_stamp_otherwise() -> None:
    assert printed_at("5 1.000000000 fsync(3</m/a>) = 0 <0.250000>") == 1_250_000_000
    assert printed_at("5 2.0 <... fsync resumed>) = 0 <0.5>") == 2_000_000_000
    assert printed_at("garbage") is None


def test_split_args_respects_strings_structures_and_annotations() -> None:
    args, after = split_args('3</a,b)>, "x, \\"y)", [{iov_base="q", iov_len=1}], 7) = 1')
    assert args == ["3</a,b)>", '"x, \\"y)"', '[{iov_base="q", iov_len=1}]', "7"]
    assert after == " = 1"


def test_open_flag_names() -> None:
    assert open_flag_names(O_WRONLY | O_CREAT | O_TRUNC) == "O_WRONLY|O_CREAT|O_TRUNC"
    assert open_flag_names(O_WRONLY | O_SYNC) == "O_WRONLY|O_SYNC"


# -- generated traces ------------------------------------------------------------------

_NAME = st.text(
    alphabet=st.sampled_from(list('abz09._- <>"\\\n\tü')), min_size=1, max_size=8
).filter(lambda s: s not in (".", ".."))


def escape(raw: bytes, extra: str = "") -> str:
    """strace's quoting: printable ASCII as is, C escapes, octal for the rest."""
    out = []
    special = {10: "\\n", 9: "\\t", 13: "\\r", 11: "\\v", 12: "\\f", 34: '\\"', 92: "\\\\"}
    for i, b in enumerate(raw):
        if b in special and chr(b) not in extra:
            out.append(special[b])
        elif 32 <= b < 127 and chr(b) not in extra:
            out.append(chr(b))
        else:
            nxt = raw[i + 1 : i + 2]
            width = 3 if nxt and 48 <= nxt[0] <= 55 else 1
            out.append("\\" + format(b, "o").rjust(width, "0"))
    return "".join(out)


def _render(pid: int, ns: int, name: str, args: str, result: str, dur: int) -> tuple[str, str, str]:
    """The whole line, and the unfinished/resumed pair, of one call."""
    stamp = f"{ns // 10**9}.{ns % 10**9:09d}"
    end_ns = ns + dur
    end = f"{end_ns // 10**9}.{end_ns % 10**9:09d}"
    tail = f" = {result} <0.{dur:09d}>"
    whole = f"{pid} {stamp} {name}({args}){tail}"
    start = f"{pid} {stamp} {name}({args} <unfinished ...>"
    resumed = f"{pid} {end} <... {name} resumed>){tail}"
    return whole, start, resumed


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[tuple[int, str, list[str]]], list[dict[str, object]]]:
    """Calls of up to three processes on /mnt, rendered as strace would print them."""
    n = draw(st.integers(1, 25))
    ns = 1_796_522_124_000_000_000
    expected: list[dict[str, object]] = []
    lines: list[tuple[int, str, list[str]]] = []  # (pid, whole, [start, resumed])
    for _ in range(n):
        pid = draw(st.sampled_from([101, 102, 103]))
        name = draw(_NAME)
        path = "/mnt/" + name
        raw = path.encode()
        ann = escape(raw, "<>")
        kind = draw(
            st.sampled_from(["openat", "write", "pwrite64", "fsync", "renameat2", "unlink"])
        )
        ns += draw(st.integers(1, 10**6))
        dur = draw(st.integers(0, 10**6))
        if kind == "openat":
            flags = draw(st.sampled_from([0x241, 0x41, 0x1041, 0x101041, 0x80000]))
            args = f'-100</mnt>, "{escape(name.encode())}", {flags:#x}, 0644'
            result = f"3</{ann[1:]}>"
            exp = {"name": kind, "path": path, "flags": flags, "fd": 3}
        elif kind in ("write", "pwrite64"):
            data = draw(st.binary(max_size=6))
            args = f'4</{ann[1:]}>, "{escape(data)}", {len(data)}'
            exp = {"name": kind, "path": path, "length": len(data), "data": data}
            if kind == "pwrite64":
                off = draw(st.integers(0, 1 << 40))
                args += f", {off}"
                exp["offset"] = off
            result = str(len(data))
        elif kind == "fsync":
            args, result = f"4</{ann[1:]}>", "0"
            exp = {"name": kind, "path": path, "fd": 4}
        elif kind == "renameat2":
            other = draw(_NAME)
            args = (
                f'-100</mnt>, "{escape(name.encode())}", -100</mnt>, "{escape(other.encode())}", 0'
            )
            result = "0"
            exp = {"name": kind, "path": path, "path2": "/mnt/" + other}
        else:
            args, result = f'"{escape(raw)}"', "0"
            exp = {"name": kind, "path": path}
        exp.update(pid=pid, enter_ns=ns, exit_ns=ns + dur)
        whole, start, resumed = _render(pid, ns, kind, args, result, dur)
        lines.append((pid, whole, [start, resumed]))
        expected.append(exp)
    return lines, expected


def _interleave(lines: list[tuple[int, str, list[str]]], rng: random.Random) -> list[str]:
    """Print each call whole, or split around the next call of another process."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        pid, whole, (start, resumed) = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        if nxt is not None and nxt[0] != pid and rng.random() < 0.5:
            out += [start, nxt[1], resumed]
            i += 2
        else:
            out.append(whole)
            i += 1
    return out


def _check(trace: Trace, expected: list[dict[str, object]], complete: int) -> None:
    got = sorted(trace.calls, key=lambda c: (c.enter_ns, c.pid))
    want = sorted(expected[:complete], key=lambda e: (e["enter_ns"], e["pid"]))
    assert len(got) >= len(want)
    by_key = {(c.enter_ns, c.pid): c for c in got}
    for e in want:
        call = by_key[(e["enter_ns"], e["pid"])]  # type: ignore[index]
        for key, value in e.items():
            assert getattr(call, key) == value, (key, call, e)


@settings(deadline=None, derandomize=True, max_examples=200)
@given(traces(), st.randoms(use_true_random=False), st.data())
def test_generated_traces_parse_back_whatever_the_chunks_and_the_cut(
    drawn: tuple[list[tuple[int, str, list[str]]], list[dict[str, object]]],
    rng: random.Random,
    data: st.DataObject,
) -> None:
    lines, expected = drawn
    text = "\n".join(_interleave(lines, rng)) + "\n"
    blob = text.encode("utf-8", "surrogateescape")
    # Whole stream in random chunks: every call comes back.
    parser = StraceParser()
    pos = 0
    while pos < len(blob):
        step = data.draw(st.integers(1, 64))
        parser.feed(blob[pos : pos + step])
        pos += step
    trace = parser.trace()
    assert trace.unparsed_count == 0, trace.unparsed
    assert trace.truncated == 0
    _check(trace, expected, len(expected))
    # Cut anywhere: whole lines before the cut parse, the rest is dropped, never garbled.
    cut = data.draw(st.integers(0, len(blob)))
    cut_trace = parse_strace(blob[:cut])
    assert cut_trace.unparsed_count == 0, cut_trace.unparsed
    assert cut_trace.truncated == (0 if cut == 0 or blob[cut - 1 : cut] == b"\n" else 1)
    for call in cut_trace.calls:
        want = next(e for e in expected if (e["enter_ns"], e["pid"]) == (call.enter_ns, call.pid))
        assert call.path == want["path"]
        if call.exit_ns is not None:
            assert call.exit_ns == want["exit_ns"]


@settings(deadline=None, derandomize=True)
@given(st.binary(max_size=40))
def test_unescape_inverts_stracees_quoting(raw: bytes) -> None:
    assert unescape(escape(raw)) == raw


def test_a_seek_names_its_file_and_the_position_it_left() -> None:
    # As strace -X raw prints it, and as the tracefs converter does (no descriptor path).
    for text in (
        f"7 {T0} lseek(3</mnt/f>, 0, 2) = 42 <0.000010>\n",
        f'7 {T0} openat(-100, "/mnt/f", 0x1) = 3 <0.000010>\n'
        f"7 {T0} lseek(3, 0, 2) = 42 <0.000010>\n",
    ):
        (seek,) = parse_strace(text).of_kind(CallKind.SEEK)
        assert (seek.path, seek.fd, seek.offset) == ("/mnt/f", 3, 42)
    assert "lseek" in strace_command("true", "/run/t")
