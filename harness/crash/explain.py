"""The explanation of a failing run or crash state from its traced run (both commands).

`harness.explore.causes` is the engine; this module hands it what a cell or
a state has: the traced run (`TracedRun`), the recovered tree listed in a
guest, the tokens the workload's check did not find, the writes the cut lost
or tore (device byte ranges) and the instant of the cut or the state's point
on the host's clock. `powercut run` explains a failing cell here
(`explain_cell`), `powercut explore` each failing state (`explain_state`).

An explanation that cannot be given says why and is still an explanation
(`unexplained`, with that as its evidence): a run that was not traced, a
trace that broke, a tree that could not be listed. None of it changes a
verdict.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from harness.durability.cut import CutResult
from harness.explore.causes import Explanation, explain
from harness.explore.fileview import FileView
from harness.explore.traced import TracedRun
from harness.workloads.base import Observation
from harness.workloads.command import CommandObservation


def _unexplained(state: str, lost: Sequence[str], why: str) -> Explanation:
    boundary = f"ack {lost[0]}" if lost else "the state's point"
    return Explanation(state, tuple(lost), boundary, evidence=(why,))


def explain_state(
    traced: TracedRun,
    state: str,
    recovered: FileView | None,
    lost_tokens: Sequence[str],
    *,
    point_host_ns: int | None,
    lost_writes: Sequence[tuple[int, int]] = (),
    torn_writes: Sequence[tuple[int, int]] = (),
    why_no_view: str = "the recovered tree could not be listed",
) -> Explanation:
    """One failing state (or a cell's one state), explained by the traced run."""
    t0 = time.monotonic()
    if not traced.traced:
        return _unexplained(state, lost_tokens, traced.summary())
    if recovered is None:
        return _unexplained(state, lost_tokens, why_no_view)
    point = traced.guest_time(point_host_ns) if point_host_ns is not None else None
    found = explain(
        state,
        traced.trace,
        recovered,
        lost_tokens=list(lost_tokens),
        ack_times=traced.ack_times(),
        point_guest_ns=point,
        lost_writes=lost_writes,
        torn_writes=torn_writes,
        existing=traced.existing if traced.existing is not None else (),
        final=traced.final,
    )
    notes = tuple(f"tracing: {n}" for n in traced.notes)
    return Explanation(
        found.state,
        found.lost_tokens,
        found.boundary,
        found.causes,
        found.evidence + notes,
        found.kept,
        found.writes,
        round(time.monotonic() - t0, 3),
    )


def cut_writes(cut: CutResult | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The runner's cut as (lost, torn) device byte ranges: a write reverted in part is torn."""
    lost: list[tuple[int, int]] = []
    torn: list[tuple[int, int]] = []
    for w in cut.reverted if cut is not None else ():
        if w.blocks_reverted == 0:
            continue
        (lost if w.blocks_reverted >= w.blocks_total else torn).append((w.offset, w.length))
    return lost, torn


def explain_cell(
    traced: TracedRun,
    observation: Observation | None,
    recovered: FileView | None,
    cut: CutResult | None,
    cut_ns: int,
) -> Explanation | None:
    """`powercut run`'s failing cell: what its workload's check lost, explained (None: the
    check found nothing lost, or did not run)."""
    if not isinstance(observation, CommandObservation) or not observation.loss:
        return None
    lost, torn = cut_writes(cut)
    return explain_state(
        traced,
        "the cell's cut",
        recovered,
        observation.lost,
        point_host_ns=cut_ns,
        lost_writes=lost,
        torn_writes=torn,
    )
