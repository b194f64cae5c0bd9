"""`powercut explore SCENARIO... --out DIR`: hundreds of crash states from one recorded run.

    powercut explore scenarios/nobarrier.toml --out out/explore
    powercut explore scenarios/matrix.toml --out r --mode writeback --max-states 500 --workers 2
    powercut explore replay out/explore --state p12-torn-3 --out state.img

Each cell's workload runs once (`harness.crash.explorer.record`); the states its
contract allows are checked host-side and in one checker guest, failing ones
shrunk (`harness.crash.explorer.cell`). DIR gets explore.json (written as it
goes, `harness.crash.explorer.run`), report.html, report.md and plots/.
`replay` rebuilds any state of DIR/explore.json (minimized ones too) as an image
to mount or fsck (`harness.explore.doc.replay`).

A cell can take many minutes between two lines of output, so on a terminal a
live line shows what it is doing (`harness.crash.explorer.progress`); anywhere
else (a pipe, CI's log) only the results are printed.

Exit status (`EXIT_STATUS`, also in `--help`): 0 when every cell passed; 1 when a
state breaks its contract (a negative control: when none fails); 2 when a cell
is an error instead — its recording or its checks failed, or more of its states
than the scenario's `unjudged-states` could not be judged (a check that could
not run is not a pass); 130 after Ctrl-C (explore.json keeps what was checked).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from rich import progress as rich_progress
from rich.console import Console

from harness.commands._cells import SHIPPED, add_cell_arguments, plan_from_cell_arguments
from harness.crash.explorer.cell import CellExplorer, ExploreOptions
from harness.crash.explorer.cluster import ClusterExplorer
from harness.crash.explorer.progress import Phase, Progress
from harness.crash.explorer.record import unexplorable
from harness.crash.explorer.run import ExploreDoc, exploration_cells, spec_for
from harness.crash.images import CellImages
from harness.crash.plan import command_line
from harness.durability.contract import Verdict
from harness.errors import ConfigError
from harness.explore.doc import CellRecord, ClusterRecord, ExploreDocument, replay
from harness.report.console import STYLE
from harness.report.explore import render_explore
from harness.vm.accel import choose_accel

NAME = "explore"
HELP = "check every crash state a recorded run allows (and `explore replay` one of them)"
EXIT_STATUS = """\
exit status:
  0    every cell passed: no state breaks its contract (a negative control: some state fails)
  1    a state breaks its contract (a negative control: no state fails)
  2    a cell is an error: its recording or its checks failed, or more states than
       [explore] unjudged-states could not be judged (explore.json: states_unjudged)
  130  interrupted (Ctrl-C); explore.json keeps what was checked"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_STATUS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_cell_arguments(
        parser,
        scenarios=f"{SHIPPED}; or `replay DIR` to rebuild one explored state",
        out="results directory (explore.json, report.html); with replay: the image to write "
        "(required, except with --list)",
    )
    parser.add_argument("--state", metavar="ID", help="replay: the state's id (or N/ID: cell N's)")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="host-side checkers at once (default 1)"
    )
    parser.add_argument(
        "--max-states",
        type=int,
        metavar="N",
        help="states per cell (overrides [explore] max-states)",
    )
    parser.add_argument(
        "--host-only", action="store_true", help="check host-side only (no checker guest)"
    )
    parser.add_argument(
        "--verify-every",
        type=int,
        default=0,
        metavar="N",
        help="read the checker guest's whole disk before every Nth check and compare it with "
        "the state (proves nothing of one state reaches the next; slow)",
    )


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator[rich_progress.Progress | None]:
    """A live display of the work on a terminal; None (nothing drawn) anywhere else."""
    if not console.is_terminal:
        yield None
        return
    with rich_progress.Progress(
        rich_progress.SpinnerColumn(),
        rich_progress.TextColumn("{task.description}"),
        rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(),
        rich_progress.TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        yield bar


class _CellLine:
    """The running cell's line: its phase and counters; the bar, its phase's states."""

    def __init__(self, bar: rich_progress.Progress | None, label: str) -> None:
        self.bar = bar
        self.label = label
        self.phase: Phase | None = None
        self.task = bar.add_task(f"{label}: prepare", total=None) if bar is not None else None

    def __call__(self, progress: Progress) -> None:
        if self.bar is None or self.task is None:
            return
        changed = progress.phase is not self.phase
        self.phase = progress.phase
        self.bar.update(
            self.task,
            description=f"{self.label}: {progress.describe()}",
            total=progress.planned or None,
            completed=progress.checked,
            refresh=changed,
        )

    def close(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)


def make_console() -> Console:
    """The command's console (a test may give it another)."""
    return Console()


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.scenarios[0] == "replay":
        return _replay(args, console)
    if args.state is not None:
        raise ConfigError("--state is for `powercut explore replay DIR --state ID --out IMAGE`")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: at least 1")
    plan = plan_from_cell_arguments(
        args,
        out_required="--out DIR is required: the results directory (explore.json, report.html, "
        "the recordings); only --list runs without one",
    )
    cells = exploration_cells(plan.scenarios, plan.cells)
    skipped = [(c, why) for c in cells if (why := unexplorable(c))]
    cells = [c for c in cells if not unexplorable(c)]
    if args.list:
        for c in cells:
            console.print(f"{c.scenario}: {c.exploration_id}  seed={c.seed}", markup=False)
        for c, why in skipped:
            console.print(f"{c.scenario}: {c.exploration_id}  skipped: {why}", markup=False)
        return 0
    if not cells:
        raise ConfigError(f"no cell can be explored: {skipped[0][1]}")
    options = ExploreOptions(
        workers=args.workers,
        guest=False if args.host_only else None,
        max_states=args.max_states,
        verify_every=max(0, args.verify_every),
    )
    for c in cells:  # a bad budget is an error before anything boots
        CellExplorer.check_budget(spec_for(c, plan.scenarios), options)
    out = Path(args.out)
    with progress_display(console) as bar:
        images = CellImages()
        if bar is None:
            images.prepare(cells)
        else:
            build = bar.add_task("guest image", total=None)
            images.prepare(
                cells, lambda what: bar.update(build, description=f"guest image: {what}")
            )
            bar.remove_task(build)
        accel = choose_accel(plan.accel, images(cells[0]).kernel)
        doc = ExploreDoc(out, command_line(sys.argv[1:]))
        for index, (c, why) in enumerate(skipped):
            console.print(
                f"[yellow]SKIP [/] {c.scenario}: {c.exploration_id}: {why}", soft_wrap=True
            )
            doc.add_cell(CellRecord.skipped(index, c.exploration_id, c.scenario, why))
        interrupted = False
        try:
            for index, cell in enumerate(cells, start=len(skipped)):
                prefix = f"{index}/" if len(cells) + len(skipped) > 1 else None
                line = _CellLine(bar, f"{cell.scenario}: {cell.exploration_id}")
                try:
                    explorer: CellExplorer | ClusterExplorer
                    if cell.cluster is not None:  # every node recorded, combinations booted
                        explorer = ClusterExplorer(
                            cell,
                            spec_for(cell, plan.scenarios),
                            out / "cells" / f"{index:03d}",
                            images(cell),
                            out=out,
                            index=index,
                            max_states=options.max_states,
                            accel=accel,
                            doc=doc,
                            on_progress=line,
                        )
                    else:
                        explorer = CellExplorer(
                            cell,
                            spec_for(cell, plan.scenarios),
                            out / "cells" / f"{index:03d}",
                            images(cell),
                            out=out,
                            index=index,
                            options=options,
                            accel=accel,
                            doc=doc,
                            replay_prefix=prefix,
                            on_progress=line,
                        )
                    result = explorer.run()
                finally:
                    line.close()
                record = result.record
                verdict = record.verdict.value if record.verdict is not None else "error"
                style = STYLE.get(verdict, "default")
                console.print(
                    f"[{style}]{verdict.upper():5}[/] {cell.scenario}: {record.id}: "
                    f"{record.reason}",
                    highlight=False,
                    soft_wrap=True,
                )
                for text in cause_lines(record):
                    console.print(f"  {text}", markup=False, soft_wrap=True)
        except KeyboardInterrupt:
            interrupted = True
    document = doc.finish(interrupted=interrupted)
    report = render_explore(out, document)
    counts = document.counts
    console.print(
        f"{counts.states_explored} states explored ({counts.states_unique} unique), "
        f"{counts.states_failing} failing, {counts.states_breaking_contract} breaking the "
        f"contract, {counts.states_unjudged} not judged; {out / 'explore.json'}, {report}",
        markup=False,
    )
    for cell_record in document.cells:
        for s in cell_record.breaking[:3]:
            console.print(f"  {s.id}: {s.replay or ''}", markup=False, soft_wrap=True)
        for s in cell_record.unjudged[:3]:
            why = "; ".join(f"{c.checker}: {c.detail}" for c in s.checks if c.ok is None)
            console.print(f"  {s.id} not judged: {why}", markup=False, soft_wrap=True)
        if cell_record.cluster is not None:
            _print_cluster(console, cell_record.cluster)
    return exit_status(document)


def _print_cluster(console: Console, cluster: ClusterRecord) -> None:
    """A cluster cell's failing and unjudged states, and what each failing one shrank to."""
    for c in cluster.failing[:3]:
        console.print(f"  {c.id}: {c.state.describe()}: {c.client}", markup=False, soft_wrap=True)
        m = c.minimized
        if m is not None and m.state is not None:
            console.print(
                f"    shrunk to {m.state.describe()} (nodes {', '.join(m.nodes) or 'none'}; "
                f"{m.losses_before} losses -> {m.losses_after}; "
                f"{m.node_checks} + {m.write_checks} cluster checks)",
                markup=False,
                soft_wrap=True,
            )
        elif m is not None:
            console.print(f"    not shrunk: {m.note or m.error}", markup=False, soft_wrap=True)
    for c in cluster.unjudged[:3]:
        console.print(f"  {c.id} not judged: {c.unjudged}", markup=False, soft_wrap=True)


def cause_lines(record: CellRecord) -> list[str]:
    """What a traced cell's failing states relied on, one line per cause; what the
    filesystem kept that was never made durable; and a trace that could not be read."""
    if record.trace is None:
        return []
    out = [f"cause: {g.line()}" for g in record.causes]
    out += [f"kept: {k}" for k in record.kept[:5]]
    if not record.trace.startswith(("not traced", "0 calls")) and not out:
        risky = sum(1 for r in record.at_risk if r.risks)
        out.append(f"trace: {record.trace}; {risky} of {len(record.at_risk)} acks had "
                   "changes not yet durable")  # fmt: skip
    elif record.trace.startswith("not traced"):
        out.append(f"trace: {record.trace}")
    return out


def exit_status(document: ExploreDocument) -> int:
    """The command's exit status for a finished exploration (`EXIT_STATUS`)."""
    if document.interrupted:
        return 130
    verdicts = {c.verdict for c in document.cells}
    if Verdict.FAIL in verdicts:
        return 1
    if Verdict.ERROR in verdicts:
        return 2
    return 0 if document.ok else 1


def _replay(args: argparse.Namespace, console: Console) -> int:
    if len(args.scenarios) != 2:
        raise ConfigError("usage: powercut explore replay DIR --state ID --out IMAGE")
    if not args.state:
        raise ConfigError("replay needs --state ID (explore.json names every state)")
    if not args.out:
        raise ConfigError("replay needs --out IMAGE (the file to write the state to)")
    image = replay(args.scenarios[1], args.state, args.out)
    console.print(f"state {args.state} written to {image}", markup=False)
    return 0
