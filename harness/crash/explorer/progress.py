"""How far one cell's exploration has got, as it goes: what a terminal shows while it works.

An exploration can run for many minutes between its first and last line of
output (a recording waits for the workload's cut moment; hundreds of states
are checked). `CellExplorer` and the `RecordingRunner` under it report a
`Progress` at every step — the phase, the acknowledgements and writes
recorded, the states checked of those planned, how many fail so far, the time
left when it can be told — to a callback; `powercut explore` draws it with
rich on a terminal and draws nothing otherwise (harness/commands/explore.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Phase(enum.Enum):
    BOOT = "boot"  # the recording's guest boots
    RECORD = "record"  # the workload runs, recorded, until its cut moment
    CUT = "cut"
    HOST = "host"  # host-side checks of every state (the checker guest boots meanwhile)
    GUEST = "guest"  # the states the host passed, in the checker guest
    MINIMIZE = "minimize"
    EXPLAIN = "explain"  # failing states of a traced run explained by its calls
    DONE = "done"


@dataclass(frozen=True)
class Progress:
    """One cell's exploration at one moment."""

    cell: str  # the exploration id
    phase: Phase
    acks: int = 0  # acknowledgements recorded
    writes: int = 0  # writes the disk completed while recording
    checked: int = 0  # states done in this phase
    planned: int = 0  # states this phase will do
    failing: int = 0  # states failing so far
    unjudged: int = 0  # states not judged so far
    seconds_left: float | None = None  # until the phase ends, when it can be told

    def describe(self) -> str:
        parts = [self.phase.value]
        if self.phase in (Phase.RECORD, Phase.CUT):
            parts.append(f"{self.acks} acks, {self.writes} writes recorded")
        if self.planned:
            parts.append(f"{self.checked}/{self.planned} states")
        if self.failing:
            parts.append(f"{self.failing} failing")
        if self.unjudged:
            parts.append(f"{self.unjudged} not judged")
        if self.seconds_left is not None:
            parts.append(f"{self.seconds_left:.0f} s left")
        return ", ".join(parts)


ProgressCallback = Callable[[Progress], None]


def seconds_left(done: float, total: float, elapsed: float) -> float | None:
    """The time `total - done` more will take at the rate so far (None: no rate yet)."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)
