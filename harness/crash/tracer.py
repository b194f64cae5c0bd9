"""A command workload's run traced in its guest, for the explanation of what it lost.

`CellRunner` (and the recording of `powercut explore`, a `CellRunner`) hands a
`RunTracer` to the workload's guest context; a command workload with `trace`
on (the default) asks it for its run command (`GuestContext.traced`), after
its setup and before the run starts. Then, in the guest:

1. the tree as the setup left it is listed (`existing`: the explanation must
   not take an O_CREAT of a file that was there for its creation, and starts
   each file's size from it);
2. tracing starts (`harness.guest.tracing.start_tracing`: the kernel's
   tracepoints, strace where the kernel lacks them, and why), on its own SSH
   channel that streams every line to the host as it comes;
3. the guest clock is sampled against the host's (`sample_offset`);
4. the workload's command comes back wrapped in the tracer.

When the workload ends by itself before the cut (`after-exit`), the trace is
read to its end and the tree listed once more (`final`, through the guest's
page cache, neither syncing nor touching an atime: the cut follows at once).
At a cut mid-run the trace is what had arrived. Either way `result` saves a
`TracedRun` (`trace.json`, the raw lines in `trace.txt`) with the
acknowledgements as the host received them.

Nothing here can fail a cell: a tracer that cannot start or breaks is kept
as the run's `error` (the explanation then says it has no trace), and the
workload runs as it would untraced. The work the tracer adds around the run
is timed on its own (`seconds`), so the run phase's own cost can be compared
with tracing off (`python -m benchmarks trace`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import PowercutError
from harness.explore.causes import AckTime
from harness.explore.clock import ClockBounds
from harness.explore.fileview import FileView
from harness.explore.traced import TRACE_TEXT, TracedRun
from harness.guest.clock import sample_offset
from harness.guest.fileview import file_view
from harness.guest.tracing import TraceStream, start_tracing

if TYPE_CHECKING:
    from harness.guest.ssh import SSHSession

log = logging.getLogger(__name__)

CLOCK_ROUND_TRIPS = 20
FINAL_LIST_TIMEOUT = 60.0  # seconds; the tree after the run is listed with the disk frozen


class RunTracer:
    """Traces one run of a command workload (see the module's docstring)."""

    def __init__(
        self,
        directory: Path,
        filesystem: str | None,
        *,
        root: str = "/mnt",
        ack_pattern: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.filesystem = filesystem or "unknown"
        self.root = root
        self.ack_pattern = ack_pattern
        self.stream: TraceStream | None = None
        self.fallback: str | None = None
        self.error: str | None = None
        self.notes: list[str] = []
        self.existing: FileView | None = None
        self.final: FileView | None = None
        self.clock: ClockBounds | None = None
        self.seconds: dict[str, float] = {}
        self.result_: TracedRun | None = None

    def _timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.monotonic() - t0, 3)

    def wrap(self, ssh: SSHSession, command: str) -> str:
        """List the tree, start tracing, sample the clock; the command as the tracer runs it."""
        t0 = time.monotonic()
        try:
            self.existing = self._list(ssh, "before the run")
            try:
                self.stream, self.fallback = start_tracing(
                    ssh, self.directory / TRACE_TEXT, cwd=self.root
                )
            except PowercutError as exc:
                self.error = f"tracing could not start: {exc}"
                log.warning("%s; the run goes on untraced", self.error)
                return command
            try:
                self.clock = sample_offset(
                    ssh, CLOCK_ROUND_TRIPS, clock_id=self.stream.mechanism.clock_id
                )
            except PowercutError as exc:
                self.notes.append(f"the guest clock could not be sampled: {exc}")
            return self.stream.command(command)
        finally:
            self._timed("prepare", t0)

    def _list(self, ssh: SSHSession, when: str, timeout: float = 300.0) -> FileView | None:
        try:
            return file_view(
                ssh, self.root, self.filesystem, sync=False, chunk_map=False, timeout=timeout
            )
        except PowercutError as exc:
            self.notes.append(f"the tree {when} could not be listed: {exc}")
            return None

    def run_ended(self, ssh: SSHSession) -> None:
        """The workload exited before the cut: read the trace to its end, list the tree."""
        if self.stream is None:
            return
        t0 = time.monotonic()
        try:
            try:
                self.stream.finish(quiet=0.3, timeout=20)
            except PowercutError as exc:
                self.notes.append(f"the trace's end could not be read: {exc}")
            # The disk may be frozen by now (a host power cut's first instant): a listing
            # that needs what the page cache lacks waits on it, so it is bounded.
            self.final = self._list(ssh, "after the run", timeout=FINAL_LIST_TIMEOUT)
        finally:
            self._timed("finish", t0)

    def at_cut(self) -> None:
        """The guest is gone: what the reader had is the trace."""
        if self.stream is not None:
            self.stream.join(10)

    def result(self, acks: list[tuple[str, int]]) -> TracedRun:
        """The traced run (saved as trace.json in the directory), acks as (token, host ns)."""
        stream = self.stream
        error = self.error
        trace = stream.trace() if stream is not None else None
        clock = self.clock
        if stream is not None and clock is not None:
            clock = clock.tighten_upper(stream.arrival_bounds())
        if stream is not None and stream.error is not None and self.final is None:
            # At a cut the reader's channel dies with the guest: that is how every cut trace ends.
            self.notes.append(f"the trace reader stopped: {type(stream.error).__name__}")
        if trace is not None and trace.unparsed_count:
            self.notes.append(f"{trace.unparsed_count} trace lines were not understood")
        traced = TracedRun(
            root=self.root,
            mechanism=stream.mechanism.value if stream is not None else None,
            trace=trace if trace is not None else TracedRun(self.root).trace,
            clock=clock,
            acks=tuple(AckTime(token, ns) for token, ns in acks),
            ack_pattern=self.ack_pattern,
            existing=self.existing,
            final=self.final,
            fallback=self.fallback,
            error=error,
            notes=tuple(self.notes),
        )
        traced.save(self.directory)
        self.result_ = traced
        return traced
