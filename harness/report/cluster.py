"""A cluster cell's nodes side by side, on one time line: what the report shows of a cluster.

One column per node and one row per instant of the cell's clock (seconds
since it began): boots, the cluster's commands, acknowledgements, each
node's cut and what its policy did, the check. A run of acknowledgements
is one row (`1..20 acked`), so a cut reads right after the last ack it
followed. Judges nothing: the rows are the record's (`CellResult.timeline`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.report.results import CellResult, TimelineEvent

_ACKED = re.compile(r"^(\d+) acked$")


@dataclass(frozen=True)
class TimelineRow:
    at: float
    until: float | None  # the last instant of a run of acknowledgements
    cells: tuple[str, ...]  # one per node, "" where nothing happened

    @property
    def when(self) -> str:
        return f"{self.at:.2f}" if self.until is None else f"{self.at:.2f}-{self.until:.2f}"


def node_names(cell: CellResult) -> tuple[str, ...]:
    names = [n.name for n in cell.nodes]
    for e in cell.timeline:
        if e.node and e.node not in names:
            names.append(e.node)
    return tuple(names)


def timeline_rows(cell: CellResult) -> list[TimelineRow]:
    """The cell's time line as rows of one column per node (acknowledgement runs folded)."""
    names = node_names(cell)
    rows: list[TimelineRow] = []
    run: list[TimelineEvent] = []

    def flush_run() -> None:
        if not run:
            return
        first, last = _ACKED.match(run[0].event), _ACKED.match(run[-1].event)
        assert first is not None and last is not None
        text = run[0].event if len(run) == 1 else f"{first.group(1)}..{last.group(1)} acked"
        until = run[-1].at if len(run) > 1 else None
        rows.append(TimelineRow(run[0].at, until, _place(names, run[0].node, text)))
        run.clear()

    for e in sorted(cell.timeline, key=lambda e: e.at):
        if _ACKED.match(e.event) and (not run or run[-1].node == e.node):
            run.append(e)
            continue
        flush_run()
        if _ACKED.match(e.event):
            run.append(e)
            continue
        rows.append(TimelineRow(e.at, None, _place(names, e.node, e.event)))
    flush_run()
    return _merge_instants(rows)


def _merge_instants(rows: list[TimelineRow]) -> list[TimelineRow]:
    """Rows of one instant on different nodes as one row: a rack cut reads across."""
    merged: list[TimelineRow] = []
    for row in rows:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.at == row.at
            and last.until is None
            and row.until is None
            and not any(a and b for a, b in zip(last.cells, row.cells, strict=True))
        ):
            cells = tuple(a or b for a, b in zip(last.cells, row.cells, strict=True))
            merged[-1] = TimelineRow(row.at, None, cells)
        else:
            merged.append(row)
    return merged


def _place(names: tuple[str, ...], node: str, text: str) -> tuple[str, ...]:
    if not node:
        return tuple(text for _ in names)
    return tuple(text if n == node else "" for n in names)


def node_rows(cell: CellResult) -> list[tuple[str, ...]]:
    """(node, mode, lost power at, disk verdict, why) for each node."""
    return [
        (
            n.name,
            n.mode,
            f"{n.cut_at:.2f} s" if n.cut_at is not None else ("yes" if n.cut else "kept power"),
            n.verdict,
            n.reason,
        )
        for n in cell.nodes
    ]
