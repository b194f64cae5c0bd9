"""One owner for every child process: QEMU, backends, daemons, fio.

A process started here dies with the harness (PR_SET_PDEATHSIG), lives in its
own process group so a signal reaches its children too, writes stdout and
stderr to a log file that outlives it for post-mortems, and is killed by PID
and reaped when its context ends — also when the test that started it fails.
An orphaned QEMU on a 2-core machine ruins every later measurement, so this is
the only place that calls `subprocess.Popen` for long-lived children.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from harness.errors import ProcessError, TimeoutExpired

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# Every live ManagedProcess, so a test session can prove it left nothing behind.
_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


def live_processes() -> list[ManagedProcess]:
    """The managed processes that have been started and not yet reaped."""
    with _live_lock:
        return [p for p in _live if p.running]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the harness dies, so does the child.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ManagedProcess:
    """A child process owned by a `with` block (or by explicit start/stop).

    `stop()` sends `stop_signal` to the process group, waits `stop_timeout`
    seconds, then SIGKILLs the group; it never touches a PID it did not start.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path | str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        pass_fds: Sequence[int] = (),
        stdin: int | None = subprocess.DEVNULL,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.pass_fds = tuple(pass_fds)
        self.stdin = stdin
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise ProcessError(f"{self.name} was already started (pid {self._popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        log_file.write(f"# {' '.join(self.argv)}\n".encode())
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=self.stdin,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                pass_fds=self.pass_fds,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            log_file.close()
            raise ProcessError(
                f"cannot start {self.name} ({self.argv[0]}): {exc.strerror}; "
                "is it installed? run ci/bootstrap"
            ) from exc
        self._log_file = log_file
        with _live_lock:
            _live.add(self)
        log.debug("started %s pid %d: %s", self.name, self._popen.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ProcessError(f"{self.name} has not been started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is None:
            raise ProcessError(f"{self.name} has not been started")
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutExpired(
                f"{self.name} (pid {self.pid}) still running after {timeout}s"
            ) from exc

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the process group, if the process is still ours and alive."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process group and reap it: an abrupt death (a power cut, a crash)."""
        if self._popen is None:
            return
        self.signal(signal.SIGKILL)
        self._popen.wait()
        self._finish()

    def stop(self) -> int | None:
        """Ask politely, then kill; always reaps. Returns the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.signal(self.stop_signal)
            try:
                self._popen.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored %s; killing it", self.name, self.pid, self.stop_signal.name
                )
                self.signal(signal.SIGKILL)
                self._popen.wait()
        # The group may hold children that outlived the leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._finish()
        return self._popen.returncode

    def _finish(self) -> None:
        with _live_lock:
            _live.discard(self)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process log, for error messages and failed-test reports."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
    ) -> None:
        """Poll `condition` until true; fail at once, with the log, if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return
            if not self.running:
                raise ProcessError(
                    f"{self.name} exited with status {self.returncode} while waiting for {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutExpired(
                    f"{what}: not after {timeout:.0f}s; {self.name} log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval)

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid {self._popen.pid}"
        return f"<ManagedProcess {self.name} {state}>"


@contextlib.contextmanager
def managed(
    argv: Sequence[str], *, name: str, log_path: Path | str, **kwargs: object
) -> Iterator[ManagedProcess]:
    """`with managed([...], name=..., log_path=...) as proc:` — started, and always stopped."""
    proc = ManagedProcess(argv, name=name, log_path=log_path, **kwargs)  # type: ignore[arg-type]
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
