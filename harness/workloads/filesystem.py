"""The filesystem under a workload: made on the host, mounted in the guest, checked after a cut.

mkfs runs on the host before the crash-test session starts, so a power cut
can never revert the mkfs itself, only what the guest did; inode tables and
the journal are initialised then, so the guest's lazy-init thread adds no
writes of its own. After the reboot the runner mounts it (the journal
replays) and the `FSCK` checker runs the filesystem's own checker.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from harness.errors import ConfigError, PowercutError
from harness.guest.ssh import SSHSession
from harness.workloads.base import DEVICE, MOUNT, Observation

EXT4 = "ext4"
FILESYSTEMS = (EXT4,)


@dataclass(frozen=True)
class FsckObservation(Observation):
    mounted: bool  # the filesystem mounted (journal replay succeeded)
    exit_code: int  # e2fsck -fn: 0 clean, 1 fixed (not with -n), >= 2 damage left
    output_tail: str = ""

    @property
    def clean(self) -> bool:
        return self.mounted and self.exit_code in (0, 1)

    @property
    def loss(self) -> bool:
        return not self.clean

    def summary(self) -> str:
        if not self.mounted:
            return "the filesystem did not mount (journal replay failed)"
        if not self.clean:
            return f"e2fsck -fn exited {self.exit_code}: the filesystem is damaged"
        return f"mounted; e2fsck -fn exited {self.exit_code}"


def make_disk(
    path: Path, size: int, *, filesystem: str | None = None, directories: Sequence[str] = ()
) -> None:
    """A fresh sparse image; with `filesystem`, made here on the host with `directories` in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    if filesystem is None:
        return
    if filesystem not in FILESYSTEMS:
        raise ConfigError(f"filesystem {filesystem!r} is not supported; use one of {FILESYSTEMS}")
    argv = ["mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"]
    root: Path | None = None
    try:
        if directories:
            root = Path(tempfile.mkdtemp(prefix="powercut-mkfs-"))
            for d in directories:
                (root / d).mkdir(parents=True, exist_ok=True)
            argv += ["-d", str(root)]
        proc = subprocess.run(
            [*argv, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    except FileNotFoundError:
        raise ConfigError("mkfs.ext4 is not installed on the host; run ci/bootstrap") from None
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        raise PowercutError(f"mkfs.ext4 {path} failed ({proc.returncode}): {proc.stderr.strip()}")


def mount(ssh: SSHSession, filesystem: str = EXT4) -> bool:
    """Mount the disk under test at `MOUNT` (replaying the journal); False if it will not."""
    return ssh.run(f"mkdir -p {MOUNT} && mount -t {filesystem} {DEVICE} {MOUNT}", timeout=120).ok


def fsck(ssh: SSHSession, mounted: bool, out: TextIO) -> FsckObservation:
    """Unmount (if mounted) and run the filesystem's checker read-only; its output goes to `out`."""
    if mounted:
        ssh.run(f"umount {MOUNT}", timeout=120, check=True)
    result = ssh.run(f"e2fsck -fn {DEVICE}", timeout=300)
    text = result.stdout + result.stderr
    out.write(f"$ e2fsck -fn {DEVICE}  (exit {result.exit_code})\n{text}\n")
    return FsckObservation(mounted, result.exit_code, "\n".join(text.splitlines()[-10:]))
