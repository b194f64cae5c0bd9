"""A traced run as it is kept with its cell: the calls, the clock, the tree before and after.

`powercut explore` keeps one in its recording (`recording/trace.json`), `powercut
run` in the cell's directory (`trace.json`); the explanation
(`harness.explore.causes`) reads nothing else of the run. Written by
`harness.crash.tracer.RunTracer`, which traced the workload in the guest.

A run whose tracing could not start, or whose trace broke, keeps that as
`error` (and `fallback` says why strace traced instead of the kernel's
tracepoints): an explanation that has no trace to read says so, and no
verdict depends on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.explore.causes import AckTime, ack_guest_times
from harness.explore.clock import ClockBounds
from harness.explore.fileview import FileView
from harness.explore.syscalls import Trace

TRACE_FILE = "trace.json"
TRACE_TEXT = "trace.txt"  # the raw lines as they arrived (the evidence)
TRACE_VERSION = 1


@dataclass(frozen=True)
class TracedRun:
    """One run of a workload, traced (or why it was not)."""

    root: str  # the workload's tree (the mount point)
    mechanism: str | None = None  # "tracefs" or "strace"; None: not traced
    trace: Trace = field(default_factory=Trace)
    clock: ClockBounds | None = None  # host = guest + d, lo <= d <= hi
    acks: tuple[AckTime, ...] = ()  # every acknowledgement as the host received it
    ack_pattern: str | None = None  # the workload's acknowledgement regex (one group)
    existing: FileView | None = None  # the tree before the run (after setup)
    final: FileView | None = None  # the tree after the run, before the cut (None: cut mid-run)
    fallback: str | None = None  # why the preferred mechanism could not trace
    error: str | None = None  # tracing did not start, or broke: what happened
    notes: tuple[str, ...] = ()  # what else went wrong on the way (a listing that failed)

    @property
    def traced(self) -> bool:
        return self.mechanism is not None and self.error is None

    def ack_times(self) -> dict[str, tuple[int, int]]:
        """Per token, (credit until, blame until) on the guest's clock (`ack_guest_times`)."""
        clock = self.clock or ClockBounds(0, 0, consistent=False)
        return ack_guest_times(self.trace, self.acks, clock, self.token_of)

    @property
    def token_of(self) -> Callable[[str], str | None]:
        pattern = re.compile(self.ack_pattern) if self.ack_pattern else None

        def token(line: str) -> str | None:
            if pattern is None:
                return None
            m = pattern.search(line.rstrip("\r"))
            return m.group(1) if m else None

        return token

    def guest_time(self, host_ns: int) -> tuple[int, int]:
        """A host instant as (latest, earliest) guest times: (host - lo, host - hi)."""
        clock = self.clock or ClockBounds(0, 0, consistent=False)
        return host_ns - clock.lo_ns, host_ns - clock.hi_ns

    def summary(self) -> str:
        if self.mechanism is None or self.error is not None:
            return f"not traced: {self.error or 'tracing was off'}"
        calls = len(self.trace.calls)
        via = f" (instead of tracefs: {self.fallback})" if self.fallback else ""
        return f"{calls} calls traced with {self.mechanism}{via}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TRACE_VERSION,
            "root": self.root,
            "mechanism": self.mechanism,
            "fallback": self.fallback,
            "error": self.error,
            "notes": list(self.notes),
            "clock": self.clock.to_json() if self.clock is not None else None,
            "ack_pattern": self.ack_pattern,
            "acks": [a.to_json() for a in self.acks],
            "existing": self.existing.to_json() if self.existing is not None else None,
            "final": self.final.to_json() if self.final is not None else None,
            "trace": self.trace.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TracedRun:
        clock, existing, final = raw.get("clock"), raw.get("existing"), raw.get("final")
        return cls(
            root=str(raw.get("root", "/mnt")),
            mechanism=raw.get("mechanism"),
            trace=Trace.from_json(raw.get("trace") or {}),
            clock=ClockBounds.from_json(clock) if clock is not None else None,
            acks=tuple(AckTime.from_json(a) for a in raw.get("acks", [])),
            ack_pattern=raw.get("ack_pattern"),
            existing=FileView.from_json(existing) if existing is not None else None,
            final=FileView.from_json(final) if final is not None else None,
            fallback=raw.get("fallback"),
            error=raw.get("error"),
            notes=tuple(str(n) for n in raw.get("notes", [])),
        )

    def save(self, directory: Path) -> Path:
        path = Path(directory) / TRACE_FILE
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path


def load_traced(directory: Path) -> TracedRun | None:
    """The traced run kept in `directory`, or None when the run was not traced."""
    path = Path(directory) / TRACE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != TRACE_VERSION:
        raise ConfigError(f"{path} is not a trace this powercut reads (version {TRACE_VERSION})")
    return TracedRun.from_json(raw)
