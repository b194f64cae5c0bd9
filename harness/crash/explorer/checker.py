"""The checker guest: one long-lived guest that checks crash state after crash state.

Its disk is the `crash-state` block driver over the recording's base (never
written): each state is a delta file, presented with the control socket's
`state-switch`, which also throws away whatever the guest wrote to the
previous state. In the guest, one helper process on one SSH channel
(`harness.guest.checker`) does, per state, in one request: mount the state
(journal recovery, the scenario's mount options), run the workload's own
`check` with the run as it stood at the state's point, unmount, and drop the
block device's page cache (BLKFLSBUF), so neither the guest's cache nor the
mount's own writes reach the next state. `verify` reads the whole device
before the mount and compares its MD5 with the state's, which is how the VM
test proves that.

The workload's `check` is the one the runner calls after a reboot, unchanged:
it sees a `GuestContext` whose `ssh.run` goes through the helper
(`CheckerShell`). A check that runs more than one command mounts and
releases the state around each, which is correct and only slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from harness.block.options import format_dotted
from harness.durability.contract import CacheMode
from harness.errors import GuestError, PowercutError, TimeoutExpired
from harness.explore.doc import CheckSummary, GuestFsck, GuestRecord
from harness.explore.fileview import Chunk, FileView, parse_chunk_tree, parse_view
from harness.guest import fileview
from harness.guest.checker import CheckerLoop, text
from harness.guest.ssh import CommandResult, LineCallback, SSHSession
from harness.vm.backends import ProcessBackend
from harness.vm.daemons import ServeOptions
from harness.vm.image import GuestImage
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, MachineSpec
from harness.workloads import filesystem
from harness.workloads.base import DEVICE, MOUNT, Observation, Run, Workload
from harness.workloads.command import CommandObservation

log = logging.getLogger(__name__)

CHECKER_DIR = "checker"  # the checker guest's directory, in its cell's
CHECK_ERRORS = "check-errors.log"  # there: every check that could not run, with its output

# mount(8)'s generic options, as mount(2) flags (value, set): the rest go to the filesystem.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 128, 1024, 2048
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
_GENERIC = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
}


def mount_request(fstype: str, options: str = "") -> dict[str, Any]:
    """The helper's mount step: mount(8)'s options split into mount(2) flags and data."""
    flags = 0
    data = []
    for opt in (o for o in options.split(",") if o):
        if opt == "defaults":
            continue
        generic = _GENERIC.get(opt)
        if generic is None:
            data.append(opt)
        elif generic[1]:
            flags |= generic[0]
        else:
            flags &= ~generic[0]
    return {
        "device": DEVICE,
        "dir": MOUNT,
        "type": fstype,
        "flags": flags,
        "data": ",".join(data),
        "options": options,
    }


# Words a shell gives a meaning of its own: a command starting with one needs the shell.
_SHELL_WORDS_TEXT = """
! { } [[ ]] case do done elif else esac fi for function if in select then time until while
. : alias bg break builtin cd command continue eval exec exit export fc fg getopts hash jobs
kill let local printf pwd read readonly return set shift source test times trap type ulimit
umask unalias unset wait echo true false
"""
_SHELL_WORDS = frozenset(_SHELL_WORDS_TEXT.split())


def plain_argv(command: str) -> list[str] | None:
    """The command as a word list when a shell would just run it (`shlex.join`'s output)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if not argv or shlex.join(argv) != command or argv[0] in _SHELL_WORDS:
        return None
    if "=" in argv[0] or any(c in word for word in argv for c in "*?[~"):
        return None
    return argv


class NotMounted(GuestError):
    """The state did not mount (its journal did not recover)."""


class CheckerShell:
    """`ctx.ssh` for a workload's check in the checker guest (everything else: the real one).

    Each `run` is one helper request: mount the state, the command, release.
    """

    def __init__(
        self,
        ssh: SSHSession,
        loop: CheckerLoop,
        mount: dict[str, Any] | None,
        *,
        drop_cache: bool = True,
    ) -> None:
        self._ssh = ssh
        self.loop = loop
        self.mount = mount
        self.drop_cache = drop_cache  # False only for the control that shows what it prevents
        self.after: str | None = None
        self.digest: str | None = None
        self.answers: list[dict[str, Any]] = []
        self.commands: list[str | None] = []  # each answer's command

    def begin(self, *, after: str | None = None, digest: bool = False) -> None:
        self.after = after
        self.digest = DEVICE if digest else None
        self.answers = []
        self.commands = []

    def _request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.digest is not None and not self.answers:
            req["digest"] = self.digest
        if self.mount is not None:
            req["mount"] = self.mount
        req["release"] = {
            "dir": MOUNT if self.mount is not None else None,
            "device": DEVICE if self.drop_cache else None,
        }
        if self.after is not None:
            req["after"] = self.after
        answer = self.loop.request(req, timeout + 60)
        self.answers.append(answer)
        self.commands.append(req.get("command"))
        return answer

    def end(self) -> None:
        """A state whose check ran no command is still mounted and released once."""
        if not self.answers:
            self._request({"timeout": 120}, 120)

    def run(
        self,
        command: str,
        timeout: float = 60.0,
        *,
        check: bool = False,
        input: bytes | None = None,
        on_stdout: LineCallback | None = None,
        on_stderr: LineCallback | None = None,
    ) -> CommandResult:
        req: dict[str, Any] = {"command": command, "timeout": max(1, int(timeout))}
        argv = plain_argv(command)
        if argv is not None:
            req["argv"] = argv
        if input is not None:
            req["stdin"] = input.decode("utf-8", "replace")
        answer = self._request(req, timeout)
        mounted = answer.get("mount")
        if mounted is not None and not mounted.get("ok"):
            raise NotMounted(str(mounted.get("error") or "the state did not mount"))
        got = answer.get("command") or {}
        if got.get("timed_out"):
            raise TimeoutExpired(f"guest command {command!r} still running after {timeout:.0f}s")
        result = CommandResult(
            command, int(got.get("exit", -1)), text(got.get("stdout")), text(got.get("stderr"))
        )
        for callback, out in ((on_stdout, result.stdout), (on_stderr, result.stderr)):
            if callback is not None:
                for line in out.splitlines():
                    callback(line)
        return result.check() if check else result

    def check_output(self, command: str, timeout: float = 60.0) -> str:
        return self.run(command, timeout, check=True).stdout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ssh, name)


class _Context:
    """The `GuestContext` a workload's check sees in the checker guest."""

    def __init__(self, guest: CheckerGuest) -> None:
        self._guest = guest

    @property
    def ssh(self) -> SSHSession:
        return cast(SSHSession, self._guest.shell)

    @property
    def directory(self) -> Path:
        return self._guest.directory

    def host_port(self, guest_port: int) -> int:
        return self._guest.machine.host_port(guest_port)

    @property
    def fio_server_port(self) -> int | None:
        return self._guest.machine.spec.fio_server_port

    def time_left(self, cap: float | None = None) -> float:
        return cap if cap is not None else 300.0

    def check_deadline(self, what: str) -> None:
        """States have no cell deadline: each helper request has its own timeout."""

    def traced(self, command: str) -> str:
        return command  # the checker guest runs checks, never a run


@dataclass(frozen=True)
class GuestCheck:
    """What the checker guest found in one state (`record()`: as explore.json keeps it)."""

    mounted: bool | None  # None: the workload needs no filesystem
    observation: Observation | None  # the workload's own check (None: it did not run)
    error: str | None = None  # the check could not judge (it raised), or the mount's error
    fsck: GuestFsck | None = None  # the guest's filesystem checker after the release
    device_md5: str | None = None
    seconds: float = 0.0
    phases: dict[str, int] = field(default_factory=dict)  # helper ms: mount, command, release

    @property
    def failed(self) -> bool:
        if self.mounted is False:
            return True
        if self.observation is not None and (self.observation.loss or self.observation.corruption):
            return True
        return bool(self.fsck is not None and not self.fsck.ok)

    def record(self) -> GuestRecord:
        obs = self.observation
        check = None
        if obs is not None:
            lost = obs.lost if isinstance(obs, CommandObservation) else ()
            check = CheckSummary(obs.loss, obs.corruption, obs.summary(), tuple(lost))
        return GuestRecord(
            mounted=self.mounted,
            seconds=round(self.seconds, 3),
            check=check,
            error=self.error,
            fsck=self.fsck,
            device_md5=self.device_md5,
            ms=dict(self.phases),
        )


class CheckerGuest:
    """One guest on a `crash-state` disk over `base`; `check` judges one state after another."""

    def __init__(
        self,
        directory: Path,
        image: GuestImage,
        base: Path,
        workload: Workload,
        seed: int,
        *,
        filesystem_name: str | None,
        mount_options: str = "",
        accel: Accel | None = None,
        memory_mib: int = 512,
        drop_cache: bool = True,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.drop_cache = drop_cache
        self.directory.mkdir(parents=True, exist_ok=True)
        self.workload = workload
        self.seed = seed
        self.filesystem = filesystem_name
        self.mount = mount_request(filesystem_name, mount_options) if filesystem_name else None
        self.rundir = Path(tempfile.mkdtemp(prefix="pc-"))
        self.socket = self.rundir / "state.sock"
        blockdev = format_dotted(
            {
                "driver": "crash-state",
                "node-name": "state",
                "file": {"driver": "file", "filename": str(base)},
            }
        )
        try:
            options = ServeOptions(
                blockdev=blockdev,
                socket=self.socket,
                cache=CacheMode.UNSAFE,  # nothing the checker writes is kept anyway
                verbose=1,
            )
            self.backend = ProcessBackend.logging_in(options, self.directory, "state")
            spec = MachineSpec.from_image(
                image,
                disks=(self.backend.disk(),),
                memory_mib=memory_mib,
                name="checker",
                needs=(filesystem_name,) if filesystem_name else (),
            )
            self.machine = QemuMachine(spec, workdir=self.rundir / "vm", accel=accel, keep=True)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        self.ssh: SSHSession | None = None
        self.loop: CheckerLoop | None = None
        self.shell: CheckerShell | None = None
        self.context = _Context(self)
        self.checks = 0
        self.broken: str | None = None
        self.boot_seconds = 0.0
        self._view_ready = False

    def start(self, timeout: float = 180.0) -> None:
        """Serve the base, boot, start the helper, and mount the base once (module loads)."""
        t0 = time.monotonic()
        self.backend.start()
        self.ssh = self.machine.boot(timeout)
        self.ssh.run(filesystem.WAIT_FOR_MODULES, timeout=60)  # the helper's first mount
        self.loop = CheckerLoop(self.ssh)
        self.shell = CheckerShell(self.ssh, self.loop, self.mount, drop_cache=self.drop_cache)
        self.shell.begin()
        self.shell.end()
        self.boot_seconds = time.monotonic() - t0

    def switch(self, delta: Path | None) -> dict[str, Any]:
        answer: dict[str, Any] = self.backend.control(
            "state-switch", delta=str(delta) if delta is not None else None, timeout=60
        )
        return answer

    def check(
        self,
        delta: Path | None,
        run: Run,
        *,
        guest_fsck: bool = False,
        verify: bool = False,
        state: str = "",
    ) -> GuestCheck:
        """Present the state `delta` and judge it with the workload's own check.

        A check that cannot run (any harness error) judges nothing: its error, and
        what the guest said (each command, exit status, stdout, stderr), are kept in
        `CHECK_ERRORS`, which the error names with the guest's console.
        """
        if self.shell is None or self.broken:
            raise GuestError(f"the checker guest is not running: {self.broken or 'not started'}")
        t0 = time.monotonic()
        self.switch(delta)
        after = None
        if guest_fsck and self.filesystem:
            after = f"{filesystem.get(self.filesystem).fsck} {DEVICE}"
        self.shell.begin(after=after, digest=verify)
        observation: Observation | None = None
        error: str | None = None
        mounted: bool | None = True if self.mount is not None else None
        try:
            observation = self.workload.check(self.context, self.seed, run)
        except NotMounted as exc:
            mounted, error = False, str(exc)
        except TimeoutExpired as exc:
            # The helper is gone with its channel: no further state can be checked here.
            self.broken = str(exc)
            raise
        except PowercutError as exc:
            error = self._keep_failed(state, f"{type(exc).__name__}: {exc}")
        self.shell.end()
        self.checks += 1
        return self._result(mounted, observation, error, time.monotonic() - t0)

    def view(self, delta: Path | None, timeout: float = 300.0) -> FileView:
        """The workload's tree in the state `delta`, as its mount recovers it (the explanation's
        view: names, sizes, digests, extents; on btrfs with the chunk map, read unmounted)."""
        if self.shell is None or self.broken:
            raise GuestError(f"the checker guest is not running: {self.broken or 'not started'}")
        if self.mount is None or self.filesystem is None:
            raise GuestError("the workload has no filesystem to list")
        if not self._view_ready:
            assert self.ssh is not None
            fileview.install(self.ssh)
            self._view_ready = True
        self.switch(delta)
        self.shell.begin()
        try:
            listing = self.shell.run(fileview.view_command(MOUNT, sync=False), timeout)
            chunks: tuple[Chunk, ...] = ()
            if self.filesystem == "btrfs" and listing.ok:
                dump = self.shell.run(f"btrfs inspect-internal dump-tree -t chunk {DEVICE}", 120)
                chunks = parse_chunk_tree(dump.stdout) if dump.ok else ()
        finally:
            self.shell.end()
        if not listing.ok:
            raise GuestError(f"the tree could not be listed: {listing.stderr.strip()[-300:]}")
        return parse_view(listing.stdout, MOUNT, self.filesystem, chunks)

    def _keep_failed(self, state: str, error: str) -> str:
        """Keep what a check that could not run said; the error, naming where it is."""
        assert self.shell is not None
        kept = self.directory / CHECK_ERRORS
        lines = [f"== state {state or '?'}: {error}"]
        for command, answer in zip(self.shell.commands, self.shell.answers, strict=True):
            got = answer.get("command")
            if isinstance(got, dict):
                lines.append(f"$ {command}  (exit {got.get('exit')})")
                lines += [f"stdout: {x}" for x in text(got.get("stdout")).splitlines()]
                lines += [f"stderr: {x}" for x in text(got.get("stderr")).splitlines()]
        with contextlib.suppress(OSError), open(kept, "a") as f:
            f.write("\n".join(lines) + "\n")
        console = self.directory / "console.log"
        return f"{error} (kept: its output {kept}, the checker guest's console {console})"

    def _result(
        self,
        mounted: bool | None,
        observation: Observation | None,
        error: str | None,
        seconds: float,
    ) -> GuestCheck:
        assert self.shell is not None
        answers = self.shell.answers
        phases: dict[str, int] = {}
        md5 = None
        fsck: GuestFsck | None = None
        for answer in answers:
            for step in ("mount", "command", "release", "after"):
                got = answer.get(step)
                if isinstance(got, dict) and "ms" in got:
                    phases[step] = phases.get(step, 0) + int(got["ms"])
            if answer.get("digest"):
                md5 = str(answer["digest"])
            release = answer.get("release")
            if isinstance(release, dict) and not release.get("ok"):
                # A state that cannot be let go would leak into the next one.
                self.broken = f"could not release a state: {release.get('error')}"
            if isinstance(answer.get("after"), dict) and self.filesystem:
                got = answer["after"]
                fs = filesystem.get(self.filesystem)
                fsck = GuestFsck(
                    fs.fsck,
                    got.get("exit"),
                    got.get("exit") in fs.clean,
                    "\n".join(
                        (text(got.get("stdout")) + text(got.get("stderr"))).splitlines()[-5:]
                    ),
                )
        if mounted is not False and self.mount is not None:
            first = answers[0].get("mount") if answers else None
            if isinstance(first, dict) and not first.get("ok"):
                mounted, error = False, str(first.get("error"))
        return GuestCheck(mounted, observation, error, fsck, md5, seconds, phases)

    def close(self) -> None:
        try:
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.close()
            self.machine.close()
        finally:
            self.backend.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(self.machine.console_log.path, self.directory / "console.log")
            shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> CheckerGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_md5(path: Path, size: int) -> str:
    """The MD5 of an image file's first `size` bytes (what the guest's device shows)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                h.update(bytes(left))
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


Factory = Callable[..., CheckerGuest]
