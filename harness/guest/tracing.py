"""Tracing a workload's whole process tree in the guest, streamed to the host as it runs.

The power cut kills the guest with everything in its memory, so the trace
cannot wait in the guest until the run ends: strace writes into a FIFO in
/run and a second SSH channel (`cat FIFO`) carries each line to the host
while the workload runs, where `TraceStream` parses it (`StraceParser`),
keeps the raw text (`trace.txt`, the evidence) and time-stamps every line's
arrival on the host's CLOCK_MONOTONIC: a call's line cannot arrive before the
call returned, which bounds the guest clock's offset from above
(`harness.guest.clock`). What strace wrote after the last line that arrived
is lost with the guest; `TraceStream.horizon_ns` says up to when the trace is
whole.

A FIFO's writer blocks in open(2) until the reader is there, so the workload
cannot start untraced; if the reader dies the writer blocks on a full pipe
(64 KiB) rather than dropping lines: a trace with a hole would be worse than
a stalled workload, which the runner's timeout ends.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import GuestError
from harness.guest.syscalls import StraceParser, Trace, printed_at, strace_command

if TYPE_CHECKING:
    from harness.guest.ssh import SSHSession

log = logging.getLogger(__name__)

FIFO = "/run/powercut-trace.fifo"


class TraceStream:
    """The reader side: a thread on its own SSH channel that parses lines as they arrive."""

    def __init__(self, ssh: SSHSession, text_file: Path, fifo: str = FIFO) -> None:
        self.ssh = ssh
        self.fifo = fifo
        self.text_file = text_file
        self.parser = StraceParser()
        self.samples: list[tuple[int, int]] = []  # (guest ns printed by, host ns arrived)
        self.lines = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trace-reader", daemon=True)

    def start(self) -> TraceStream:
        """Make the FIFO and start reading it (the workload's strace opens the other end)."""
        q = _quote(self.fifo)
        result = self.ssh.run(f"rm -f {q} && mkfifo -m 600 {q}", timeout=30)
        if not result.ok:
            raise GuestError(f"cannot make the trace FIFO {self.fifo}: {result.stderr.strip()}")
        self._thread.start()
        return self

    def command(self, workload: str) -> str:
        """The workload's command, traced into this stream's FIFO."""
        return strace_command(workload, self.fifo)

    def _run(self) -> None:
        try:
            with open(self.text_file, "a", buffering=1) as out:

                def line(text: str) -> None:
                    now = time.monotonic_ns()
                    printed = printed_at(text)
                    with self._lock:
                        self.lines += 1
                        if printed is not None:
                            self.samples.append((printed, now))
                        self.parser.line(text)
                    out.write(text + "\n")

                self.ssh.run(f"exec cat {_quote(self.fifo)}", timeout=24 * 3600, on_stdout=line)
        except Exception as exc:  # noqa: BLE001 - the guest dies at the cut; paramiko says so its way
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def trace(self) -> Trace:
        with self._lock:
            return self.parser.trace()

    def arrival_bounds(self) -> list[tuple[int, int]]:
        """(guest ns, host ns) per line: strace had printed the line by guest time `g`
        (a call's line is printed when it returns), and the host had it at `h`, so
        the offset host - guest is at most h - g."""
        with self._lock:
            return list(self.samples)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
