"""Session hygiene beyond processes: harness temp dirs and unix sockets left behind fail the
session (and are removed); pytest's own tmp_path and cleaned-up things do not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import hygiene

pytest_plugins = ["pytester"]


def test_leftovers_lists_harness_temp_dirs_and_bound_sockets_until_removed() -> None:
    mark = hygiene.watch()
    ours = Path(tempfile.mkdtemp(prefix="powercut-hygiene-"))
    theirs = Path(tempfile.mkdtemp(prefix="unrelated-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = theirs / "s.sock"
    try:
        sock.bind(str(path))
        assert hygiene.leftovers(mark) == [ours, path]
        assert hygiene.is_socket(path) and not hygiene.is_socket(ours)
        assert hygiene.leftovers(mark, exclude=[theirs]) == [ours]
        for leftover in hygiene.leftovers(mark):
            hygiene.remove(leftover)
        assert hygiene.leftovers(mark) == [] and not ours.exists() and not path.exists()
    finally:
        sock.close()
        os.rmdir(theirs)


def test_a_leaked_temp_dir_and_socket_fail_the_session_loudly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket, tempfile
        from pathlib import Path

        def test_leaks():
            run = Path(tempfile.mkdtemp(prefix="pc-leaky-"))
            other = Path(tempfile.mkdtemp(prefix="elsewhere-"))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(other / "vhost.sock"))
            s.close()
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        ["*hygiene check FAILED*", "*directory */pc-leaky-*", "*socket */vhost.sock"]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    leaked = [
        line.split()[-1]
        for line in result.stdout.lines
        if line.strip().startswith(("directory", "socket"))
    ]
    assert len(leaked) == 2 and not any(Path(p).exists() for p in leaked), "must remove them"
    os.rmdir(Path(leaked[1]).parent)  # the unrelated dir that held the socket


def test_sockets_in_tmp_path_and_cleaned_up_dirs_pass(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import shutil, socket, tempfile
        from pathlib import Path

        def test_tidy(tmp_path, monkeypatch):
            monkeypatch.chdir(tmp_path)  # a relative name: the nested tmp_path is too long
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("vhost.sock")  # pytest keeps tmp_path: not a leak
            s.close()
            run = tempfile.mkdtemp(prefix="powercut-tidy-")
            shutil.rmtree(run)
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    assert "hygiene check FAILED" not in result.stdout.str()


def test_processes_naming_finds_a_command_line_as_pgrep_f_does_without_procps() -> None:
    marker = f"powercut-hygiene {os.getpid()} a=b,c [d]"  # spaces: matched across arguments
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(60)", *marker.split(" ", 1)]
    )
    try:
        deadline = time.monotonic() + 30
        while not (found := hygiene.processes_naming(marker)):
            assert time.monotonic() < deadline, "the child never showed up in /proc"
            time.sleep(0.05)
        assert [pid for pid, _ in found] == [child.pid]
        assert found[0][1].endswith(f"time.sleep(60) {marker}")
    finally:
        child.kill()
        child.wait()
    assert hygiene.processes_naming(marker) == []
    own = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")
    assert os.getpid() not in [pid for pid, _ in hygiene.processes_naming(os.fsdecode(own))]
