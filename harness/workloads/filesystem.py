"""The filesystem under a workload: made on the host, mounted in the guest, checked after a cut.

mkfs runs on the host before the crash-test session starts, so a power cut
can never revert the mkfs itself, only what the guest did; with ext4 the
inode tables and the journal are initialised then, so the guest's lazy-init
thread adds no writes of its own. After the reboot the runner mounts it (the
journal or log replays) and the `FSCK` checker unmounts it and runs the
filesystem's own checker read-only.

One row per filesystem in `FILESYSTEMS`; the guest image carries the tools
and the kernel modules of all four.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from harness.errors import ConfigError
from harness.guest.ssh import SSHSession
from harness.workloads.base import DEVICE, MOUNT, Observation


@dataclass(frozen=True)
class Filesystem:
    name: str
    mkfs: tuple[str, ...]  # the host command, before the scenario's options and the image
    min_size: int  # the smallest image its mkfs accepts
    fsck: str  # the guest's read-only checker, on the unmounted device
    clean: tuple[int, ...]  # the checker's exit codes that mean "no damage"
    # How mkfs puts directories into the new filesystem (None: made in the guest, then synced).
    populate: str | None = None


FILESYSTEMS: dict[str, Filesystem] = {
    fs.name: fs
    for fs in (
        Filesystem(
            "ext4",
            ("mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"),
            1 << 20,
            "e2fsck -fn",
            (0, 1),  # 1: errors corrected — impossible with -n, so it means clean
            populate="-d",
        ),
        # mkfs.xfs refuses filesystems under 300 MB (xfsprogs 5.19 and later).
        Filesystem("xfs", ("mkfs.xfs", "-f", "-q", "-K"), 300 << 20, "xfs_repair -n", (0,)),
        Filesystem(
            "btrfs", ("mkfs.btrfs", "-f", "-q", "-K"), 128 << 20, "btrfs check --readonly", (0,)
        ),
        Filesystem(
            "f2fs", ("mkfs.f2fs", "-f", "-q", "-t", "0"), 64 << 20, "fsck.f2fs --dry-run", (0,)
        ),
    )
}
NAMES = tuple(FILESYSTEMS)


def get(name: str) -> Filesystem:
    try:
        return FILESYSTEMS[name]
    except KeyError:
        raise ConfigError(
            f"filesystem {name!r} is not supported; use one of {', '.join(NAMES)}"
        ) from None


def default_size(name: str, wanted: int = 256 << 20) -> int:
    """`wanted`, or the filesystem's minimum when that is larger (rounded up to 64 MiB)."""
    minimum = get(name).min_size
    return max(wanted, -(-minimum // (64 << 20)) * (64 << 20))


@dataclass(frozen=True)
class FsckObservation(Observation):
    mounted: bool  # the filesystem mounted (its journal or log replayed)
    exit_code: int  # the checker's exit status
    output_tail: str = ""
    command: str = "e2fsck -fn"  # the checker that ran
    clean_codes: tuple[int, ...] = (0, 1)

    @property
    def clean(self) -> bool:
        return self.mounted and self.exit_code in self.clean_codes

    @property
    def loss(self) -> bool:
        return not self.clean

    def summary(self) -> str:
        if not self.mounted:
            return "the filesystem did not mount (journal replay failed)"
        if not self.clean:
            return f"{self.command} exited {self.exit_code}: the filesystem is damaged"
        return f"mounted; {self.command} exited {self.exit_code}"


def make_disk(
    path: Path,
    size: int,
    *,
    filesystem: str | None = None,
    directories: Sequence[str] = (),
    mkfs_options: Sequence[str] = (),
) -> None:
    """A fresh sparse image; with `filesystem`, made here on the host with `directories` in it.

    Filesystems whose mkfs cannot populate (`populate` None) get their
    directories in the guest instead (`make_directories`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    if filesystem is None:
        return
    fs = get(filesystem)
    if size < fs.min_size:
        raise ConfigError(
            f"disk-size {size} is too small for {fs.name}: its mkfs needs at least "
            f"{fs.min_size >> 20} MiB"
        )
    argv = [*fs.mkfs, *mkfs_options]
    root: Path | None = None
    try:
        if directories and fs.populate is not None:
            root = Path(tempfile.mkdtemp(prefix="powercut-mkfs-"))
            for d in directories:
                (root / d).mkdir(parents=True, exist_ok=True)
            argv += [fs.populate, str(root)]
        proc = subprocess.run(
            [*argv, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    except FileNotFoundError:
        raise ConfigError(
            f"{fs.mkfs[0]} is not installed on the host; run ci/bootstrap (or powercut setup)"
        ) from None
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        raise ConfigError(
            f"{shlex.join(argv)} {path} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            " (check mkfs-options)"
        )


# The harness's own mount and unmount of the disk under test are busybox's applets: one
# static program, where util-linux's mount and umount first load libmount, libblkid and
# libselinux, ~0.04 s each under TCG, four times a cell. A workload's commands are its own.
MOUNT_COMMAND = "busybox mount"
UMOUNT_COMMAND = "busybox umount"
# The guest loads its filesystem's module in the background while it boots (images/rootinit,
# powercut.load=); this file exists until it is done. A mount waits for it (up to 30 s): one
# that raced the load could fail, and a check would take that for the filesystem's failure.
# The shell's own test costs nothing when the file is gone; `sleep` runs only while it is not.
LOADING = "/run/powercut-loading"
WAIT_FOR_MODULES = (
    f"n=0; while [ -e {LOADING} ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n + 1)); done"
)


def mount(
    ssh: SSHSession, filesystem: str = "ext4", options: str = "", out: TextIO | None = None
) -> bool:
    """Mount the disk under test at `MOUNT` (replaying its journal); False if it will not.

    The shell's own `test` looks for the mount point first: the guest root
    has it, and an exec of mkdir costs ~60 ms of emulated CPU under TCG.
    """
    opts = f" -o {shlex.quote(options)}" if options else ""
    command = (
        f"{WAIT_FOR_MODULES}; {{ test -d {MOUNT} || mkdir -p {MOUNT}; }} && "
        f"{MOUNT_COMMAND} -t {shlex.quote(filesystem)}{opts} {DEVICE} {MOUNT}"
    )
    result = ssh.run(command, timeout=120)
    if not result.ok and out is not None:  # what the mount said is the first thing to read
        said = (result.stdout + result.stderr).strip()
        out.write(f"$ mount -t {filesystem}{opts} {DEVICE} {MOUNT}  (exit {result.exit_code})\n")
        out.write(f"{said}\n")
    return result.ok


def make_directories(ssh: SSHSession, filesystem: str, directories: Sequence[str]) -> None:
    """Directories a populating mkfs would have made, made (and synced) in the guest instead."""
    if not directories or get(filesystem).populate is not None:
        return
    paths = " ".join(shlex.quote(f"{MOUNT}/{d}") for d in directories)
    ssh.run(f"mkdir -p {paths} && sync", timeout=120, check=True)


def release_script(mount: str = MOUNT) -> str:
    """Shell that kills every process holding `mount` (cwd, root, executable or an open file).

    One `find` over /proc, not a `readlink` per descriptor: under TCG each
    exec costs tens of milliseconds, and a guest has ~150 descriptors open.
    The shell running this (`$$`) is spared.
    """
    q = shlex.quote(mount)
    below = shlex.quote(f"{mount}/*")
    return (
        "find /proc/[0-9]*/cwd /proc/[0-9]*/root /proc/[0-9]*/exe /proc/[0-9]*/fd"
        f" -maxdepth 1 \\( -lname {q} -o -lname {below} \\) 2>/dev/null"
        " | cut -d/ -f3 | sort -u | while read -r pid; do"
        ' [ "$pid" = "$$" ] || kill -KILL "$pid" 2>/dev/null; done'
    )


# A killed process takes a moment to let go of the mount, so the unmount is tried again.
_RELEASE = f"""{release_script()}
for i in $(seq 100); do {UMOUNT_COMMAND} {MOUNT} 2>/dev/null && exit 0; sleep 0.1; done
{UMOUNT_COMMAND} {MOUNT}
"""


def unmount(ssh: SSHSession) -> None:
    """Unmount `MOUNT`; if something still uses it (a daemon the check started), kill it first.

    The plain unmount comes first and is all a cell usually needs: the
    filesystem's own refusal (EBUSY) is what says a process holds it, and
    only then is /proc searched.
    """
    if ssh.run(f"{UMOUNT_COMMAND} {MOUNT}", timeout=120).ok:
        return
    ssh.run(_RELEASE, timeout=120, check=True)


def fsck(ssh: SSHSession, mounted: bool, out: TextIO, filesystem: str = "ext4") -> FsckObservation:
    """Unmount (if mounted) and run the filesystem's checker read-only; its output goes to `out`."""
    fs = get(filesystem)
    if mounted:
        unmount(ssh)
    result = ssh.run(f"{fs.fsck} {DEVICE}", timeout=300)
    text = result.stdout + result.stderr
    out.write(f"$ {fs.fsck} {DEVICE}  (exit {result.exit_code})\n{text}\n")
    return FsckObservation(
        mounted, result.exit_code, "\n".join(text.splitlines()[-10:]), fs.fsck, fs.clean
    )
