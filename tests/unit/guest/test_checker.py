"""The checker guest's helper (Perl, one request per line), run here on the host's Perl.

The system calls it makes for a state (mount, umount, BLKFLSBUF) need a guest
and are tested by the VM tests; everything around them — commands with and
without a shell, input, timeouts, releasing what is not mounted, the device
digest, the framing and `CheckerShell`'s view of it — is the same code here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.crash.explorer.checker import CheckerShell, NotMounted
from harness.errors import CommandError, GuestError, TimeoutExpired
from harness.guest.checker import HELPER, CheckerLoop, text

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="needs perl")


class PipeChannel:
    """A paramiko Channel's surface over a local process."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.closed = False

    def _ready(self, stream: Any) -> bool:
        return bool(select.select([stream], [], [], 0)[0])

    def sendall(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv_ready(self) -> bool:
        return self._ready(self.proc.stdout)

    def recv(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), n)

    def recv_stderr_ready(self) -> bool:
        return self._ready(self.proc.stderr) and self.proc.poll() is not None

    def recv_stderr(self, n: int) -> bytes:
        assert self.proc.stderr is not None
        return os.read(self.proc.stderr.fileno(), n)

    def exit_status_ready(self) -> bool:
        return self.proc.poll() is not None and not self.recv_ready()

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def close(self) -> None:
        self.closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class LocalSSH:
    """An SSHSession's two methods the helper needs, on this machine."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.channels: list[PipeChannel] = []

    def put_bytes(self, data: bytes, remote: str, mode: int | None = None) -> None:
        (self.tmp / "helper.pl").write_bytes(data)

    def open_channel(self, command: str) -> PipeChannel:
        assert command.startswith("exec perl ")
        chan = PipeChannel(["perl", str(self.tmp / "helper.pl")])
        self.channels.append(chan)
        return chan


@pytest.fixture
def loop(tmp_path: Path) -> Any:
    ssh = LocalSSH(tmp_path)
    helper = CheckerLoop(ssh)  # type: ignore[arg-type]
    yield helper
    helper.close()


def test_the_helper_is_valid_perl(tmp_path: Path) -> None:
    (tmp_path / "h.pl").write_text(HELPER)
    subprocess.run(["perl", "-c", str(tmp_path / "h.pl")], check=True, capture_output=True)


def test_commands_run_with_and_without_a_shell(loop: CheckerLoop) -> None:
    got = loop.request({"command": "echo out; echo err >&2; exit 3"}, 30)["command"]
    assert (got["exit"], got["stdout"], got["stderr"]) == (3, "out\n", "err\n")
    got = loop.request({"command": "ignored", "argv": ["printf", "%s|", "a b", "$HOME"]}, 30)
    assert got["command"]["stdout"] == "a b|$HOME|"  # no shell: nothing expanded


def test_input_reaches_the_command_even_with_requests_queued_behind_it(
    loop: CheckerLoop,
) -> None:
    # Perl reads requests ahead: a command's stdin must still be its own input.
    loop._chan.sendall(
        b'{"id": 1, "command": "cat", "stdin": "h\\u00e9llo\\n"}\n'
        b'{"id": 2, "command": "cat", "stdin": "again\\n"}\n'
    )
    first, second = (json.loads(loop._line(30)) for _ in range(2))
    assert text(first["command"]["stdout"]) == "héllo\n"
    assert text(second["command"]["stdout"]) == "again\n"


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(loop: CheckerLoop) -> None:
    got = loop.request({"command": "sleep 30", "timeout": 1}, 30)["command"]
    assert got["timed_out"] and got["exit"] == -2
    got = loop.request({"command": "cat", "stdin": "next\n"}, 30)["command"]
    assert got["stdout"] == "next\n" and not got["timed_out"]


def test_output_bytes_survive_the_trip(loop: CheckerLoop) -> None:
    got = loop.request({"argv": ["printf", "caf\\303\\251 \\377"], "command": "x"}, 30)
    assert text(got["command"]["stdout"]) == "café \ufffd"


def test_release_of_what_is_not_mounted_is_fine_and_the_digest_is_the_content(
    loop: CheckerLoop, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(70000))
    got = loop.request({"digest": str(disk), "release": {"dir": str(tmp_path)}}, 30)
    assert got["digest"] == hashlib.md5(disk.read_bytes()).hexdigest()
    assert got["release"]["ok"]


def test_the_shell_runs_each_command_between_mount_and_release(loop: CheckerLoop) -> None:
    sent: list[dict[str, Any]] = []
    real = loop.request

    def spy(req: dict[str, Any], timeout: float) -> dict[str, Any]:
        sent.append(dict(req))
        if "mount" in req:
            req = {k: v for k, v in req.items() if k not in ("mount", "release")}
        return real(req, timeout)

    loop.request = spy  # type: ignore[method-assign]
    shell = CheckerShell(None, loop, {"device": "/dev/vda", "dir": "/mnt", "type": "ext4"})  # type: ignore[arg-type]
    shell.begin(after="true", digest=True)
    lines: list[str] = []
    assert shell.run("echo a; echo b", on_stdout=lines.append).stdout == "a\nb\n"
    assert lines == ["a", "b"]
    with pytest.raises(CommandError):
        shell.check_output("exit 4")
    shell.end()  # it ran commands: nothing more to send
    assert len(sent) == 2
    assert sent[0]["digest"] == "/dev/vda" and "digest" not in sent[1]
    assert all(r["mount"]["dir"] == "/mnt" and r["release"]["device"] == "/dev/vda" for r in sent)
    assert all(r["after"] == "true" for r in sent)
    shell.begin()
    shell.end()  # a check that ran nothing: mounted and released once
    assert len(sent) == 3 and "command" not in sent[2]


def test_a_state_that_does_not_mount_and_a_hung_command_are_reported(loop: CheckerLoop) -> None:
    def refuse(req: dict[str, Any], timeout: float) -> dict[str, Any]:
        return {"mount": {"ok": False, "error": "mount /dev/vda: Structure needs cleaning"}}

    shell = CheckerShell(None, loop, {"device": "/dev/vda"})  # type: ignore[arg-type]
    shell.loop = type("L", (), {"request": staticmethod(refuse)})()  # type: ignore[assignment]
    shell.begin()
    with pytest.raises(NotMounted, match="needs cleaning"):
        shell.run("true")
    shell = CheckerShell(None, loop, None)  # type: ignore[arg-type]
    shell.begin()
    with pytest.raises(TimeoutExpired):
        shell.run("sleep 30", timeout=1)


def test_a_helper_that_dies_is_a_clear_error(tmp_path: Path) -> None:
    ssh = LocalSSH(tmp_path)
    helper = CheckerLoop(ssh)  # type: ignore[arg-type]
    try:
        helper._chan.proc.kill()  # type: ignore[attr-defined]
        helper._chan.proc.wait()  # type: ignore[attr-defined]
        with pytest.raises((GuestError, OSError)):
            helper.request({"command": "true"}, 10)
    finally:
        helper.close()


def test_two_helpers_on_one_machine_keep_their_output_apart(tmp_path: Path) -> None:
    # The unit tests run helpers in parallel on one host: each command's output
    # files must be its helper's own (a shared file gave one test another's bytes).
    first, second = (CheckerLoop(LocalSSH(tmp_path)) for _ in range(2))  # type: ignore[arg-type]
    try:
        first._chan.sendall(b'{"id": 1, "command": "echo first; sleep 2"}\n')
        time.sleep(0.5)  # the first command has opened its output file and written to it
        assert second.request({"command": "echo second"}, 30)["command"]["stdout"] == "second\n"
        assert json.loads(first._line(30))["command"]["stdout"] == "first\n"
    finally:
        first.close()
        second.close()


def test_a_helper_leaves_no_output_files_behind(tmp_path: Path) -> None:
    ssh = LocalSSH(tmp_path)
    helper = CheckerLoop(ssh)  # type: ignore[arg-type]
    helper.request({"command": "cat", "stdin": "x"}, 30)
    files = [Path(f"/run/powercut-checker.{helper.pid}.{kind}") for kind in ("out", "err", "in")]
    assert all(f.exists() for f in files)
    ssh.channels[0].proc.stdin.close()  # type: ignore[union-attr]  # end of requests: it exits
    ssh.channels[0].proc.wait(30)
    helper.close()
    assert not any(f.exists() for f in files)
