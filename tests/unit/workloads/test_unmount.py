"""Unmounting the disk under test before its checker runs: cheap when nothing holds it.

The check phase unmounts after every cell; searching /proc for holders cost
5 s per cell under TCG (a `readlink` exec per open descriptor), so the plain
unmount goes first and the search runs only when the filesystem refuses.
The search itself runs here on the host's /proc against processes of our own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.errors import CommandError
from harness.guest.ssh import CommandResult
from harness.workloads import filesystem
from harness.workloads.base import MOUNT


class FakeSSH:
    """Answers `umount` with the exit codes given, in order; records every command."""

    def __init__(self, *umount_codes: int) -> None:
        self.codes = list(umount_codes)
        self.commands: list[str] = []

    def run(self, command: str, timeout: float = 60.0, *, check: bool = False, **_: Any) -> Any:
        self.commands.append(command)
        code = self.codes.pop(0)
        result = CommandResult(command, code, "", "umount: target is busy" if code else "")
        return result.check() if check else result


def test_an_unmount_that_succeeds_searches_no_processes() -> None:
    ssh = FakeSSH(0)
    filesystem.unmount(ssh)  # type: ignore[arg-type]
    assert ssh.commands == [f"{filesystem.UMOUNT_COMMAND} {MOUNT}"]


def test_a_busy_mount_has_its_holders_killed_then_is_unmounted() -> None:
    ssh = FakeSSH(32, 0)
    filesystem.unmount(ssh)  # type: ignore[arg-type]
    assert ssh.commands[0] == f"{filesystem.UMOUNT_COMMAND} {MOUNT}"
    assert len(ssh.commands) == 2
    assert "find /proc/" in ssh.commands[1] and "kill -KILL" in ssh.commands[1]
    assert f"{filesystem.UMOUNT_COMMAND} {MOUNT}" in ssh.commands[1]


def test_a_mount_that_stays_busy_is_an_error() -> None:
    ssh = FakeSSH(32, 32)
    with pytest.raises(CommandError):
        filesystem.unmount(ssh)  # type: ignore[arg-type]


def _wait_dead(proc: subprocess.Popen[bytes], seconds: float = 10.0) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            return code
        time.sleep(0.02)
    return None


@pytest.mark.skipif(shutil.which("find") is None, reason="find is not installed")
def test_release_script_kills_exactly_the_processes_that_hold_the_directory(
    tmp_path: Path,
) -> None:
    held = tmp_path / "mnt"
    (held / "sub").mkdir(parents=True)
    (held / "file").write_bytes(b"x")
    sibling = tmp_path / "mntx"  # shares the prefix, is not below it
    sibling.mkdir()
    (sibling / "file").write_bytes(b"y")
    sleep = ["sleep", "60"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["cwd"] = subprocess.Popen(sleep, cwd=held / "sub")
        with open(held / "file", "rb") as f:
            procs["fd"] = subprocess.Popen(sleep, stdin=f, cwd=tmp_path)
        with open(sibling / "file", "rb") as f:
            procs["sibling"] = subprocess.Popen(sleep, stdin=f, cwd=sibling)
        procs["elsewhere"] = subprocess.Popen(sleep, cwd=tmp_path)
        subprocess.run(["sh", "-c", filesystem.release_script(str(held))], check=True, timeout=60)
        assert _wait_dead(procs["cwd"]) == -9
        assert _wait_dead(procs["fd"]) == -9
        assert procs["sibling"].poll() is None
        assert procs["elsewhere"].poll() is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_mount_waits_for_the_background_module_load_and_keeps_what_a_failure_said() -> None:
    import io

    class Refusing(FakeSSH):
        def run(self, command: str, timeout: float = 60.0, **kw: Any) -> Any:
            self.commands.append(command)
            return CommandResult(command, 32, "", "mount: mounting /dev/vda on /mnt failed")

    ssh = Refusing()
    out = io.StringIO()
    assert not filesystem.mount(ssh, "xfs", "noatime", out)  # type: ignore[arg-type]
    (command,) = ssh.commands
    # The wait for images/rootinit's background load comes before the mount.
    assert command.index(filesystem.LOADING) < command.index(f"{filesystem.MOUNT_COMMAND} -t xfs")
    assert "(exit 32)" in out.getvalue() and "mounting /dev/vda on /mnt failed" in out.getvalue()
