"""Tracing a workload's whole process tree in the guest, streamed to the host as it runs.

Two mechanisms, one model (`harness.explore.syscalls.Trace`): the kernel's
syscall tracepoints through tracefs (`harness.guest.tracefs`), the default
because it costs the run phase least (a process-per-insert run: 1.1-1.5x
against strace's 2.0-3.5x); strace where the kernel
lacks what that needs (`Mechanism.STRACE`, `start_tracing` falls back by
itself and says why). docs/tracing.md has the measurements behind the choice.

The power cut kills the guest with everything in its memory, so the trace
cannot wait in the guest until the run ends: a second SSH channel carries
each line to the host while the workload runs (tracefs: `cat trace_pipe` of
the instance; strace: `cat` of the FIFO strace writes), where `TraceStream`
parses it, keeps the raw text (the evidence) and time-stamps every line's
arrival on the host's CLOCK_MONOTONIC: an event's line cannot arrive before
the event, which bounds the guest clock's offset from above
(`harness.explore.clock`). What the guest recorded after the last line that
arrived is lost with it; `Trace.last_ns` says up to when the trace is whole.

strace's FIFO blocks its writer in open(2) until the reader is there, so the
workload cannot start untraced; tracefs's instance records from the traced
shell's first exec whether the reader keeps up or not (4 MiB of buffer).
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import GuestError
from harness.explore.syscalls import StraceParser, Trace, printed_at, strace_command
from harness.guest import tracefs
from harness.guest.clock import CLOCK_MONOTONIC, CLOCK_REALTIME
from harness.guest.tracefs import batching_reader

if TYPE_CHECKING:
    from harness.guest.ssh import SSHSession

log = logging.getLogger(__name__)

FIFO = "/run/powercut-trace.fifo"
_TRACEFS_STAMP = re.compile(
    r".*?-\d+\s+(?:\(\s*[\d-]+\)\s+)?\[\d+\]\s+(?:\S{4,5}\s+)?(\d+)\.(\d+):"
)


class Mechanism(enum.Enum):
    TRACEFS = "tracefs"
    STRACE = "strace"

    @property
    def clock_id(self) -> int:
        """The guest clock its times are on (for `harness.guest.clock.sample_offset`)."""
        return CLOCK_MONOTONIC if self is Mechanism.TRACEFS else CLOCK_REALTIME


class TracingUnavailable(GuestError):
    """The guest cannot trace with this mechanism (what is missing is in the message)."""


class TraceStream:
    """The reader side: a thread on its own SSH channel that parses lines as they arrive."""

    def __init__(
        self,
        ssh: SSHSession,
        text_file: Path,
        mechanism: Mechanism = Mechanism.TRACEFS,
        *,
        cwd: str | None = None,
    ) -> None:
        self.ssh = ssh
        self.mechanism = mechanism
        self.text_file = text_file
        self.parser = StraceParser(initial_cwd=cwd)
        self.converter = tracefs.TracefsConverter(self.parser)
        self.samples: list[tuple[int, int]] = []  # (guest ns printed by, host ns arrived)
        self.lines = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trace-reader", daemon=True)

    @property
    def fifo(self) -> str:
        return FIFO

    def start(self) -> TraceStream:
        """Prepare the guest side and start reading (raises `TracingUnavailable`)."""
        if self.mechanism is Mechanism.TRACEFS:
            result = self.ssh.run(tracefs.setup_script(), timeout=300)
            if result.exit_code != 0 or "ready" not in result.stdout:
                why = (result.stdout + result.stderr).strip().splitlines()
                raise TracingUnavailable(
                    "the guest kernel cannot trace through tracefs: "
                    + (why[-1] if why else f"setup exited {result.exit_code}")
                )
        else:
            q = _quote(FIFO)
            result = self.ssh.run(f"command -v strace && rm -f {q} && mkfifo -m 600 {q}", 30)
            if not result.ok:
                raise TracingUnavailable(
                    'the guest has no strace to trace the workload with: add "strace" to the '
                    "scenario's packages (the default image has it)"
                )
        self._thread.start()
        return self

    def command(self, workload: str) -> str:
        """The workload's command, traced into this stream."""
        if self.mechanism is Mechanism.TRACEFS:
            return tracefs.traced_command(workload)
        return strace_command(workload, FIFO)

    def _reader(self) -> str:
        if self.mechanism is Mechanism.TRACEFS:
            return tracefs.reader_command()
        return batching_reader(FIFO)

    def _run(self) -> None:
        try:
            with open(self.text_file, "a", buffering=1) as out:

                def line(text: str) -> None:
                    now = time.monotonic_ns()
                    printed = self._printed_at(text)
                    with self._lock:
                        self.lines += 1
                        if printed is not None:
                            self.samples.append((printed, now))
                        if self.mechanism is Mechanism.TRACEFS:
                            self.converter.line(text)
                        else:
                            self.parser.line(text)
                    out.write(text + "\n")

                self.ssh.run(self._reader(), timeout=24 * 3600, on_stdout=line)
        except Exception as exc:  # noqa: BLE001 - the guest dies at the cut; paramiko says so its way
            self.error = exc

    def _printed_at(self, text: str) -> int | None:
        if self.mechanism is Mechanism.STRACE:
            return printed_at(text)
        m = _TRACEFS_STAMP.match(text)
        if m is None:
            return None
        return int(m.group(1)) * 1_000_000_000 + int(m.group(2).ljust(9, "0")[:9])

    def finish(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """After the workload: wait until no line has come for `quiet` s, then stop reading."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._lock:
                lines = self.lines
            if lines == seen:
                break
            seen = lines
            time.sleep(quiet)
        if self.mechanism is Mechanism.TRACEFS:
            self.ssh.run(tracefs.stop_command(), timeout=30)
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def trace(self) -> Trace:
        with self._lock:
            if self.mechanism is Mechanism.TRACEFS:
                return self.converter.trace()
            return self.parser.trace()

    def arrival_bounds(self) -> list[tuple[int, int]]:
        """(guest ns, host ns) per line: the guest had recorded the line by guest time `g`
        (strace prints a call when it returns; tracefs stamps an event when it happens),
        and the host had it at `h`, so the offset host - guest is at most h - g."""
        with self._lock:
            return list(self.samples)


def start_tracing(
    ssh: SSHSession,
    text_file: Path,
    prefer: Mechanism = Mechanism.TRACEFS,
    *,
    cwd: str | None = None,
) -> tuple[TraceStream, str | None]:
    """A started stream with the preferred mechanism, else the other; and why it fell back."""
    try:
        return TraceStream(ssh, text_file, prefer, cwd=cwd).start(), None
    except TracingUnavailable as exc:
        other = Mechanism.STRACE if prefer is Mechanism.TRACEFS else Mechanism.TRACEFS
        log.info("tracing with %s instead of %s: %s", other.value, prefer.value, exc)
        return TraceStream(ssh, text_file, other, cwd=cwd).start(), str(exc)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
